//! Prints the benchmark results as one markdown table.
//!
//! Run after the benchmarks: `cargo run -p steadfast-bench --bin report`.

use std::collections::BTreeMap;

use steadfast_bench::criterion_dir;

/// How many passes `benches/run.sh` makes (criterion baselines `pass1` …).
const PASSES: usize = 3;

/// The lowest of criterion's per-pass medians. A neighbour's burst on a shared machine only
/// ever adds time, and the passes run minutes apart, so the lowest median is the one least
/// disturbed. Falls back to criterion's latest run (`new`) when no pass was saved.
fn median_ns(group: &str, contender: &str) -> Option<f64> {
    let read = |run: &str| -> Option<f64> {
        let path = criterion_dir()
            .join(group)
            .join(contender)
            .join(run)
            .join("estimates.json");
        let text = std::fs::read_to_string(path).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        json["median"]["point_estimate"].as_f64()
    };
    let best = (1..=PASSES)
        .filter_map(|p| read(&format!("pass{p}")))
        .fold(f64::INFINITY, f64::min);
    if best.is_finite() {
        Some(best)
    } else {
        read("new")
    }
}

/// Whether a contender is a peer library's stack: not the baseline (`bare`), not ours
/// (`steadfast…`), not a hand-written floor under ours (`floor…`), not a step (`+…`).
fn is_peer(contender: &str) -> bool {
    contender != "bare"
        && !contender.starts_with("floor")
        && !contender.starts_with("steadfast")
        && !contender.starts_with('+')
}

fn main() {
    let allocs_path = criterion_dir().join("steadfast-allocs.tsv");
    let text = std::fs::read_to_string(&allocs_path).unwrap_or_else(|e| {
        eprintln!(
            "no results at {}: {e}; run `cargo bench -p steadfast-bench` first",
            allocs_path.display()
        );
        std::process::exit(1);
    });
    // Last figure per (group, contender) wins; keep first-seen order of groups and contenders.
    let mut order: Vec<(String, String)> = Vec::new();
    let mut allocs: BTreeMap<(String, String), f64> = BTreeMap::new();
    for line in text.lines() {
        let mut parts = line.split('\t');
        let (Some(g), Some(c), Some(a)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let key = (g.to_string(), c.to_string());
        if !allocs.contains_key(&key) {
            order.push(key.clone());
        }
        allocs.insert(key, a.parse().unwrap_or(f64::NAN));
    }
    println!(
        "| case | contender | ns/call (lowest median of 3 passes) | × bare | × best peer | allocs/call | 2-thread scaling |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (g, c) in &order {
        let Some(ns) = median_ns(g, c) else { continue };
        let bare = median_ns(g, "bare");
        let best_peer = order
            .iter()
            .filter(|(g2, c2)| g2 == g && is_peer(c2))
            .filter_map(|(g2, c2)| median_ns(g2, c2))
            .fold(f64::INFINITY, f64::min);
        let ratio = |base: Option<f64>| match base {
            Some(b) if b.is_finite() && b > 0.0 => format!("{:.2}", ns / b),
            _ => "—".into(),
        };
        // For `X-2t` groups: single-thread ns / two-thread ns (2.0 = perfect, 1.0 = none).
        let scaling = g
            .strip_suffix("-2t")
            .and_then(|base| median_ns(base, c))
            .map_or("".to_string(), |single| format!("{:.2}", single / ns));
        println!(
            "| {g} | {c} | {ns:.1} | {} | {} | {:.2} | {scaling} |",
            ratio(bare),
            ratio(Some(best_peer)),
            allocs[&(g.clone(), c.clone())]
        );
    }
}
