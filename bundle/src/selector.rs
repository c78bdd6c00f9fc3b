//! Label selectors (matchLabels + matchExpressions), as Kubernetes defines them, for choosing
//! clusters.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A set-based requirement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Expression {
    pub key: String,
    pub operator: Operator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// Kubernetes' `LabelSelector`. An empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Expression>,
}

impl LabelSelector {
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| {
                let value = labels.get(&e.key);
                match e.operator {
                    Operator::In => value.is_some_and(|v| e.values.contains(v)),
                    Operator::NotIn => value.is_none_or(|v| !e.values.contains(v)),
                    Operator::Exists => value.is_some(),
                    Operator::DoesNotExist => value.is_none(),
                }
            })
    }

    /// Checks the operators' value rules; `field` names the selector in errors.
    pub fn validate(&self, field: &str) -> Result<()> {
        for (i, e) in self.match_expressions.iter().enumerate() {
            let needs_values = matches!(e.operator, Operator::In | Operator::NotIn);
            if needs_values == e.values.is_empty() {
                return Err(Error::Selector {
                    field: format!("{field}.matchExpressions[{i}].values"),
                    reason: if needs_values {
                        format!("{:?} needs at least one value", e.operator)
                    } else {
                        format!("{:?} takes no values", e.operator)
                    },
                });
            }
            if e.key.is_empty() {
                return Err(Error::Selector {
                    field: format!("{field}.matchExpressions[{i}].key"),
                    reason: "must not be empty".into(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selector_table() {
        let sel: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchLabels": {"tier": "prod"},
            "matchExpressions": [
                {"key": "region", "operator": "In", "values": ["eu", "us"]},
                {"key": "canary", "operator": "DoesNotExist"}
            ]
        }))
        .unwrap();
        let table = [
            (labels(&[("tier", "prod"), ("region", "eu")]), true),
            (labels(&[("tier", "prod"), ("region", "ap")]), false),
            (labels(&[("tier", "dev"), ("region", "eu")]), false),
            (
                labels(&[("tier", "prod"), ("region", "us"), ("canary", "true")]),
                false,
            ),
        ];
        for (l, want) in table {
            assert_eq!(sel.matches(&l), want, "{l:?}");
        }
        assert!(LabelSelector::default().matches(&labels(&[])));
    }

    #[test]
    fn invalid_selectors_name_the_field() {
        let sel: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchExpressions": [{"key": "region", "operator": "In"}]
        }))
        .unwrap();
        let err = sel.validate("spec.targets.selector").unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.targets.selector.matchExpressions[0].values: In needs at least one value"
        );
        let unknown =
            serde_json::from_value::<LabelSelector>(serde_json::json!({"matchLabel": {}}));
        assert!(unknown.is_err());
    }
}
