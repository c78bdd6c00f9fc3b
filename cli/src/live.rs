//! A view that changes while the operator watches (the demo's table, waits): on a terminal each
//! frame replaces the last in place; otherwise frames are appended, so logs and pipes keep every
//! state the fleet went through.

use std::io::IsTerminal;

pub(crate) struct Live {
    tty: bool,
    /// Lines of the frame on screen, to move back over.
    drawn: usize,
}

impl Live {
    pub(crate) fn new() -> Self {
        Self::with_terminal(std::io::stdout().is_terminal())
    }

    fn with_terminal(tty: bool) -> Self {
        Self { tty, drawn: 0 }
    }

    /// Shows `lines` as the current frame.
    pub(crate) fn show(&mut self, lines: &[String]) {
        for line in self.frame(lines) {
            out!("{line}");
        }
    }

    /// What to write for a frame: on a terminal, first a move back over the previous frame and a
    /// clear; autowrap off while drawing, so a long message is cut at the edge instead of wrapping
    /// into lines this count would not know of.
    fn frame(&mut self, lines: &[String]) -> Vec<String> {
        if !self.tty {
            return lines.to_vec();
        }
        let mut out = Vec::with_capacity(lines.len());
        let back = match self.drawn {
            0 => String::new(),
            n => format!("\x1b[{n}F\x1b[J"),
        };
        for (i, line) in lines.iter().enumerate() {
            let mut l = String::new();
            if i == 0 {
                l.push_str(&back);
                l.push_str("\x1b[?7l");
            }
            l.push_str(line);
            if i + 1 == lines.len() {
                l.push_str("\x1b[?7h");
            }
            out.push(l);
        }
        self.drawn = lines.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminal_frame_replaces_the_last_and_a_pipe_gets_every_frame() {
        let frame = |n: usize| (0..n).map(|i| format!("row {i}")).collect::<Vec<_>>();
        let mut pipe = Live::with_terminal(false);
        assert_eq!(pipe.frame(&frame(2)), frame(2));
        assert_eq!(pipe.frame(&frame(3)), frame(3), "appended, untouched");

        let mut tty = Live::with_terminal(true);
        let first = tty.frame(&frame(2));
        assert_eq!(first, ["\x1b[?7lrow 0", "row 1\x1b[?7h"]);
        let second = tty.frame(&frame(3));
        assert_eq!(second[0], "\x1b[2F\x1b[J\x1b[?7lrow 0", "back over 2 lines");
        assert_eq!(second[2], "row 2\x1b[?7h");
        let third = tty.frame(&frame(1));
        assert_eq!(third, ["\x1b[3F\x1b[J\x1b[?7lrow 0\x1b[?7h"]);
    }
}
