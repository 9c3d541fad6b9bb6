//! What `esi-host bench` prints: one row per figure with its goal and verdict, as a table or
//! as JSON.

use serde::Serialize;
use serde_json::Value;

/// Whether a figure meets its goal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
    /// No goal: reported for context.
    Info,
}

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// A stable machine name (`e2e_1host_jobs_per_s`), the key tests and tools look for.
    pub name: String,
    /// What it is, for the table.
    pub label: String,
    pub value: f64,
    pub unit: String,
    /// The goal as text (`>= 1200`, `< 10`), if the figure has one.
    pub goal: Option<String>,
    pub verdict: Verdict,
    /// How far from the goal: value / goal for a floor, goal / value for a ceiling (>= 1
    /// meets it).
    pub goal_ratio: Option<f64>,
}

impl Figure {
    /// A figure without a goal.
    pub fn info(name: &str, label: &str, value: f64, unit: &str) -> Figure {
        Figure {
            name: name.to_string(),
            label: label.to_string(),
            value,
            unit: unit.to_string(),
            goal: None,
            verdict: Verdict::Info,
            goal_ratio: None,
        }
    }

    /// A figure that must be at least `goal`.
    pub fn at_least(name: &str, label: &str, value: f64, unit: &str, goal: f64) -> Figure {
        Figure {
            goal: Some(format!(">= {}", number(goal))),
            verdict: verdict(value >= goal),
            goal_ratio: (goal > 0.0).then(|| value / goal),
            ..Figure::info(name, label, value, unit)
        }
    }

    /// A figure that must stay below `goal` (`inclusive`: at most `goal`).
    pub fn below(
        name: &str,
        label: &str,
        value: f64,
        unit: &str,
        goal: f64,
        inclusive: bool,
    ) -> Figure {
        let (met, op) = if inclusive {
            (value <= goal, "<=")
        } else {
            (value < goal, "<")
        };
        Figure {
            goal: Some(format!("{op} {}", number(goal))),
            verdict: verdict(met),
            goal_ratio: (value > 0.0).then(|| goal / value),
            ..Figure::info(name, label, value, unit)
        }
    }
}

fn verdict(met: bool) -> Verdict {
    if met {
        Verdict::Pass
    } else {
        Verdict::Fail
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `quick` or `full`.
    pub mode: String,
    pub machine: Machine,
    pub duration_s: f64,
    pub figures: Vec<Figure>,
    /// The raw measurements behind the figures, per phase.
    pub details: Value,
}

/// Where it ran.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub etcd_version: String,
    pub esi_host_version: String,
}

impl Machine {
    pub fn describe() -> Machine {
        let etcd_version = std::process::Command::new("etcd")
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(|l| l.trim_start_matches("etcd Version:").trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            etcd_version,
            esi_host_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

impl Report {
    /// The table: figure, value, goal, verdict.
    pub fn render(&self) -> String {
        let rows: Vec<[String; 4]> = self
            .figures
            .iter()
            .map(|f| {
                [
                    f.label.clone(),
                    format!("{} {}", number(f.value), f.unit),
                    f.goal
                        .as_ref()
                        .map_or_else(|| "-".to_string(), |g| format!("{g} {}", f.unit)),
                    match f.verdict {
                        Verdict::Pass => "PASS".into(),
                        Verdict::Fail => "FAIL".into(),
                        Verdict::Info => "info".into(),
                    },
                ]
            })
            .collect();
        let header = [
            "figure".to_string(),
            "value".into(),
            "goal".into(),
            "verdict".into(),
        ];
        let mut widths = header.clone().map(|h| h.len());
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: &[String; 4]| {
            let padded: Vec<String> = cells
                .iter()
                .zip(widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            format!("| {} |\n", padded.join(" | "))
        };
        let mut out = format!(
            "esi-host bench ({}), {} CPUs, etcd {}, {:.0} s\n\n",
            self.mode, self.machine.cpus, self.machine.etcd_version, self.duration_s
        );
        out.push_str(&line(&header));
        let rule = widths.map(|w| "-".repeat(w));
        out.push_str(&line(&rule));
        for row in &rows {
            out.push_str(&line(row));
        }
        out
    }
}

/// A number with as many decimals as its size deserves.
pub fn number(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_the_goal_direction() {
        assert_eq!(
            Figure::at_least("a", "a", 10.0, "x", 5.0).verdict,
            Verdict::Pass
        );
        assert_eq!(
            Figure::at_least("a", "a", 4.0, "x", 5.0).verdict,
            Verdict::Fail
        );
        assert_eq!(
            Figure::below("a", "a", 4.0, "x", 4.0, true).verdict,
            Verdict::Pass
        );
        assert_eq!(
            Figure::below("a", "a", 4.0, "x", 4.0, false).verdict,
            Verdict::Fail
        );
        assert_eq!(Figure::info("a", "a", 1.0, "x").goal_ratio, None);
    }
}
