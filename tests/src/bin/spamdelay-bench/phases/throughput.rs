//! Measurement 2, throughput: bulk TCP over the lab's veth (iperf3) with
//! spamdelay attached and without it.

use anyhow::{Context, Result};
use spamdelay_tests::lab::Lab;

use crate::{
    check_interrupted,
    load::{iperf3, iperf3_server, start_daemon, stop_daemon},
    phases::Plan,
    report::{Outcome, Ratio, Row, Verdict},
    rounds::{Rounds, Side, sides},
};

pub(crate) fn throughput(plan: &Plan) -> Result<Outcome> {
    let lab = Lab::new().context("building the namespace lab")?;
    let _iperf = iperf3_server(&lab)?;
    iperf3(&lab, 1)?;
    let secs = plan.iperf_secs + 1;
    let mut bps = Rounds::default();
    for round in 0..plan.rounds {
        for side in sides(round) {
            check_interrupted()?;
            let daemon = match side {
                Side::A => Some(start_daemon(&lab, &["--mta", "none"])?),
                Side::B => None,
            };
            bps.push(side, iperf3(&lab, secs)?);
            if let Some(d) = daemon {
                stop_daemon(&lab, d)?;
            }
        }
    }
    let mut out = Outcome::default();
    let ratio = bps.ratio();
    out.rows.push(Row {
        metric: format!(
            "throughput, bulk TCP over the veth (iperf3, {secs} s): spamdelay attached (A) vs not (B)"
        ),
        a: format!("{:.2} Gbit/s", bps.median_a() / 1e9),
        b: format!("{:.2} Gbit/s", bps.median_b() / 1e9),
        ratio: ratio.map_or(Ratio::None, Ratio::Rounds),
        target: "≥ 0.97".into(),
        verdict: ratio.map_or(Verdict::Failed, |r| Verdict::of(r.median >= 0.97)),
    });
    out.detail.insert("bits_per_second".into(), bps.json());
    Ok(out)
}
