//! A/B comparisons in rounds: each round measures both sides, in alternating
//! order, and the ratio is taken per round so noise shows up as spread.

use serde_json::{Value, json};
use spamdelay_tests::bench::{Spread, percentile, sorted};

/// Per-round values of side A and side B.
#[derive(Default)]
pub(crate) struct Rounds {
    pub(crate) a: Vec<f64>,
    pub(crate) b: Vec<f64>,
}

impl Rounds {
    pub(crate) fn push(&mut self, side: Side, v: f64) {
        match side {
            Side::A => self.a.push(v),
            Side::B => self.b.push(v),
        }
    }

    fn ratios(&self) -> Vec<f64> {
        self.a.iter().zip(&self.b).map(|(a, b)| a / b).collect()
    }

    pub(crate) fn ratio(&self) -> Option<Spread> {
        Spread::of(&self.ratios())
    }

    pub(crate) fn median_a(&self) -> f64 {
        percentile(&sorted(&self.a), 50.0)
    }

    pub(crate) fn median_b(&self) -> f64 {
        percentile(&sorted(&self.b), 50.0)
    }

    pub(crate) fn json(&self) -> Value {
        json!({"a": self.a, "b": self.b, "ratios": self.ratios()})
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    A,
    B,
}

/// A first in even rounds, B first in odd ones, so drift over the run
/// (thermal, a neighbour's load) falls on both sides alike.
pub(crate) fn sides(round: usize) -> [Side; 2] {
    if round.is_multiple_of(2) {
        [Side::A, Side::B]
    } else {
        [Side::B, Side::A]
    }
}
