//! The report printed at the end: a table per upstream, the breaker timeline, one request's
//! id at every hop, and the gateway's metrics.

#[allow(unused_imports)]
use super::*;

pub(crate) struct Report {
    pub(crate) text: String,
    pub(crate) driver_ok: u64,
    pub(crate) driver_total: u64,
    pub(crate) traced_hops: usize,
}

pub(crate) fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

pub(crate) fn render(
    scen: &Scenario,
    elapsed: Duration,
    health: u16,
    statuses: &BTreeMap<u16, u64>,
    traced: Option<String>,
    metrics_text: &str,
) -> Report {
    let mut o = observed().lock().unwrap();
    let mut out = String::new();
    let driver_total: u64 = statuses.values().sum();
    let driver_ok = statuses.get(&200).copied().unwrap_or(0);
    let _ = writeln!(
        out,
        "steadfast demo: {driver_total} requests through the gateway in {:.1} s",
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "  client stack: attempt timeout {:?}, total {:?}, 3 attempts, budget 10 % + 10/s, breaker 5 failures / open {:?}",
        scen.attempt, scen.total, scen.open_time
    );
    let _ = writeln!(out, "  gateway /health: {health}");
    let by_status: Vec<String> = statuses.iter().map(|(s, n)| format!("{s}: {n}")).collect();
    let _ = writeln!(
        out,
        "  answers seen by the driver: {}",
        by_status.join(", ")
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| upstream | requests | ok | retries | budget denials | timeouts | rejected (open) | transitions | p50 | p99 |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|");
    for (name, u) in o.upstreams.iter_mut() {
        let transitions: Vec<String> = u
            .transitions
            .iter()
            .map(|(t, from, to)| format!("{from}→{to} @{:.1}s", t.as_secs_f64()))
            .collect();
        let (p50, p99) = (pct(&mut u.latencies, 0.5), pct(&mut u.latencies, 0.99));
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {:.1} ms | {:.1} ms |",
            u.requests,
            u.ok,
            u.retries,
            u.budget_denials,
            u.timeouts,
            u.rejected,
            if transitions.is_empty() {
                "—".to_owned()
            } else {
                transitions.join(", ")
            },
            p50.as_secs_f64() * 1000.0,
            p99.as_secs_f64() * 1000.0,
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "breaker timeline (one character per 250 ms: . closed, X open, ? half-open)"
    );
    let slots = (elapsed.as_millis() / 250) as usize + 1;
    for (name, u) in o.upstreams.iter() {
        let mut line = String::new();
        let mut state = "closed".to_owned();
        let mut k = 0;
        for s in 0..slots {
            let t = Duration::from_millis(s as u64 * 250);
            while k < u.transitions.len() && u.transitions[k].0 <= t {
                state = u.transitions[k].2.clone();
                k += 1;
            }
            line.push(match state.as_str() {
                "open" => 'X',
                "half_open" => '?',
                _ => '.',
            });
        }
        let _ = writeln!(out, "  {name:<10} {line}");
    }
    let _ = writeln!(out);
    for (name, u) in o.upstreams.iter().filter(|(_, u)| !u.ejections.is_empty()) {
        let _ = writeln!(out, "{name}: instances ejected by the balancer, and back");
        for (t, endpoint, what) in &u.ejections {
            let _ = writeln!(out, "  {:>6.2} s  {endpoint:<9} {what}", t.as_secs_f64());
        }
        let _ = writeln!(out);
    }
    let mut traced_hops = 0;
    if let Some(id) = traced {
        let _ = writeln!(out, "one request, every hop (correlation id {id}):");
        for (t, hop, cid, what) in o.hops.iter().filter(|h| h.2 == id) {
            traced_hops += 1;
            let _ = writeln!(
                out,
                "  {:>7.3}s  {hop:<10} correlation_id={cid}  {what}",
                t.as_secs_f64()
            );
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out, "gateway /metrics (steadfast_* lines):");
    for line in metrics_text
        .lines()
        .filter(|l| l.starts_with("steadfast_") && !l.contains("_bucket"))
    {
        let _ = writeln!(out, "  {line}");
    }
    Report {
        text: out,
        driver_ok,
        driver_total,
        traced_hops,
    }
}
