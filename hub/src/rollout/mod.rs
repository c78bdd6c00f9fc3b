//! Rollouts: the strategy an app's document asks for and the pure planner that moves clusters
//! through its steps ([`plan`]), and the controller that feeds the planner and persists its
//! decisions ([`controller`]).

pub mod controller;
pub mod plan;

pub use plan::*;
