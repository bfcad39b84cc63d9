//! Per-stack estimates from a stratum's drawn objects, under a mixed design.
//!
//! Every allocation of a stratum (process, kernel call site, user fingerprint)
//! is counted exactly, and drawn for full stacks with a probability `1 / 2^k`
//! fixed before its draw by past events only (census: k = 0; zoom: the level
//! userspace set; otherwise the base rate). The kernel records k with the
//! event, so the aggregator keeps exact counts per (stratum, level). Within a
//! level the draws are independent Bernoulli trials of one probability,
//! whatever the object's fate, so the drawn objects still outstanding at that
//! level are a simple random sample of the level's outstanding objects.
//!
//! So each level is estimated on its own and the levels add up:
//! - a level where every object counted was drawn (a census, `--exact`) is exact;
//! - a level with some drawn objects splits its exact count in proportion to
//!   them (unbiased given its sample size) with a Clopper-Pearson interval;
//! - a level where none was drawn cannot be split: its count stays whole, under
//!   the frames its objects share (a "partial" row), and every stack's interval
//!   widens by it, since any of those objects may be that stack's.
//!
//! The 95% intervals of the estimated levels combine by Bonferroni: each level
//! gets 95% / m of the error (m estimated levels), so the sum of the bounds
//! covers the sum of the truths with at least 95%.

/// One level's share of one quantity (outstanding objects, bytes, allocations
/// or frees) of a stratum: its exact total, how much of it was drawn, and the
/// drawn part per stack (`hits`, one entry per stack of the stratum; their sum
/// is `drawn`).
#[derive(Debug, Clone, Copy)]
pub struct Level<'a> {
    pub total: u64,
    pub drawn: u64,
    pub hits: &'a [u64],
}

/// A stratum's quantity split among its stacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Per stack: exact parts plus apportioned estimates, in whole units.
    pub per_stack: Vec<u64>,
    /// Per stack: a 95% interval for its true value (equal to it when exact).
    pub low: Vec<u64>,
    pub high: Vec<u64>,
    /// Counted at levels of which nothing was drawn: no stack can be named.
    pub undrawn: u64,
    /// Some level was split by estimate (0 < drawn < total).
    pub estimated: bool,
}

const ALPHA: f64 = 0.05;

/// Splits one quantity of a stratum, given level by level; `stacks` is the
/// number of stacks (the length of every level's `hits`). Estimates add up
/// to the exact totals of the levels that drew anything; the rest is
/// `undrawn`.
pub fn split(levels: &[Level<'_>], stacks: usize) -> Split {
    let estimated_levels = levels
        .iter()
        .filter(|l| l.drawn > 0 && l.drawn < l.total)
        .count();
    let alpha = ALPHA / estimated_levels.max(1) as f64;
    let mut out = Split {
        per_stack: vec![0; stacks],
        low: vec![0; stacks],
        high: vec![0; stacks],
        undrawn: 0,
        estimated: estimated_levels > 0,
    };
    for level in levels {
        let hit = |i: usize| level.hits.get(i).copied().unwrap_or(0);
        if level.drawn == 0 {
            out.undrawn += level.total;
            for i in 0..stacks {
                out.high[i] += level.total;
            }
        } else if level.drawn >= level.total {
            for i in 0..stacks {
                out.per_stack[i] += hit(i);
                out.low[i] += hit(i);
                out.high[i] += hit(i);
            }
        } else {
            let hits: Vec<u64> = (0..stacks).map(hit).collect();
            let shares = apportion(level.total, &hits, level.drawn);
            for i in 0..stacks {
                let (lo, hi) = interval(hits[i], level.drawn, level.total, alpha);
                out.per_stack[i] += shares[i];
                out.low[i] += lo;
                out.high[i] += hi;
            }
        }
    }
    out
}

/// Each part's estimated share of an exact `total`, `total * part / sample`,
/// in whole units that add up to `total` (largest remainders get the
/// rounding). All zeros when nothing was drawn.
pub fn apportion(total: u64, parts: &[u64], sample: u64) -> Vec<u64> {
    if sample == 0 {
        return vec![0; parts.len()];
    }
    let exact: Vec<(u64, u128)> = parts
        .iter()
        .map(|&p| {
            let num = total as u128 * p as u128;
            ((num / sample as u128) as u64, num % sample as u128)
        })
        .collect();
    let mut out: Vec<u64> = exact.iter().map(|(q, _)| *q).collect();
    let given: u64 = out.iter().sum();
    let mut order: Vec<usize> = (0..parts.len()).collect();
    order.sort_by(|&a, &b| exact[b].1.cmp(&exact[a].1).then(a.cmp(&b)));
    for &i in order.iter().take(total.saturating_sub(given) as usize) {
        out[i] += 1;
    }
    out
}

/// A `1 - alpha` interval for the number of a level's `population` objects
/// that came from one stack, given that `hits` of the `sample` drawn ones did.
///
/// The drawn objects are a simple random sample without replacement of the
/// level (each allocation drew independently with one probability, whatever
/// its fate). The proportion's interval is Clopper-Pearson's exact binomial
/// one, which covers at least `1 - alpha` (conservative: sampling without
/// replacement only narrows the truth), then clamped by what is certain: the
/// `hits` drawn objects are from this stack and the other `sample - hits`
/// drawn ones are not.
pub fn interval(hits: u64, sample: u64, population: u64, alpha: f64) -> (u64, u64) {
    use statrs::function::beta::inv_beta_reg;
    if sample == 0 {
        return (0, population);
    }
    if sample >= population {
        return (hits, hits);
    }
    let (k, n) = (hits as f64, sample as f64);
    let low = if hits == 0 {
        0.0
    } else {
        inv_beta_reg(k, n - k + 1.0, alpha / 2.0)
    };
    let high = if hits == sample {
        1.0
    } else {
        inv_beta_reg(k + 1.0, n - k, 1.0 - alpha / 2.0)
    };
    let big_n = population as f64;
    let low = (low * big_n).floor() as u64;
    let high = (high * big_n).ceil() as u64;
    let certain_high = population - (sample - hits);
    (
        low.max(hits).min(certain_high),
        high.min(certain_high).max(hits),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exact_level_adds_its_hits() {
        let s = split(
            &[Level {
                total: 5,
                drawn: 5,
                hits: &[3, 2],
            }],
            2,
        );
        assert_eq!(s.per_stack, vec![3, 2]);
        assert_eq!((s.low, s.high), (vec![3, 2], vec![3, 2]));
        assert!(!s.estimated);
        assert_eq!(s.undrawn, 0);
    }

    #[test]
    fn levels_add_up_and_an_undrawn_level_widens_every_interval() {
        // A census (exact), a sampled level, and a level nothing drew.
        let s = split(
            &[
                Level {
                    total: 4,
                    drawn: 4,
                    hits: &[4, 0],
                },
                Level {
                    total: 100,
                    drawn: 10,
                    hits: &[5, 5],
                },
                Level {
                    total: 7,
                    drawn: 0,
                    hits: &[0, 0],
                },
            ],
            2,
        );
        assert_eq!(s.per_stack, vec![54, 50]);
        assert_eq!(s.per_stack.iter().sum::<u64>() + s.undrawn, 111);
        assert_eq!(s.undrawn, 7);
        assert!(s.estimated);
        for i in 0..2 {
            assert!(s.low[i] <= s.per_stack[i] && s.per_stack[i] <= s.high[i]);
        }
        // At least the census's 4 and the drawn 5; at most what the sampled
        // level allows plus all 7 unsplit.
        assert!(s.low[0] >= 9, "{s:?}");
        assert!(s.high[0] <= 4 + 95 + 7, "{s:?}");
    }

    #[test]
    fn bonferroni_widens_each_level_when_several_are_estimated() {
        let one = interval(20, 100, 1000, ALPHA);
        let two = interval(20, 100, 1000, ALPHA / 2.0);
        assert!(two.0 <= one.0 && two.1 >= one.1 && two != one);
        let s = split(
            &[
                Level {
                    total: 1000,
                    drawn: 100,
                    hits: &[20],
                },
                Level {
                    total: 10,
                    drawn: 5,
                    hits: &[5],
                },
            ],
            1,
        );
        let second = interval(5, 5, 10, ALPHA / 2.0);
        assert_eq!((s.low[0], s.high[0]), (two.0 + second.0, two.1 + second.1));
    }

    #[test]
    fn interval_edges() {
        assert_eq!(interval(0, 0, 10, ALPHA), (0, 10));
        assert_eq!(interval(4, 10, 10, ALPHA), (4, 4));
        let (low, high) = interval(12, 12, 200, ALPHA);
        assert!((12..200).contains(&low) && high == 200, "{low}..{high}");
        let (low, high) = interval(0, 12, 200, ALPHA);
        assert!(low == 0 && high > 0 && high <= 188, "{low}..{high}");
        assert_eq!(apportion(200, &[3, 9], 12), vec![50, 150]);
        assert_eq!(apportion(200, &[0], 0), vec![0]);
    }

    #[test]
    fn apportion_keeps_totals() {
        assert_eq!(apportion(10, &[1, 1, 1], 3), vec![4, 3, 3]);
        assert_eq!(apportion(0, &[2], 2), vec![0]);
        assert_eq!(apportion(7, &[0, 0], 0), vec![0, 0]);
    }
}
