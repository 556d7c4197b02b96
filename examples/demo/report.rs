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
    let budget = scen.budget;
    let _ = writeln!(
        out,
        "  client stack: attempt timeout {:?}, total {:?}, 3 attempts, retry budget 10 % + 10/s ({:.0} % + {}/s for the gateway's calls to users, inventory and payments), breaker 5 failures / open {:?}",
        scen.attempt,
        scen.total,
        budget.ratio * 100.0,
        budget.min_per_sec,
        scen.open_time
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
        "calls, by caller → upstream (p50/p99 include calls failed fast by an open breaker; rerouted: attempts an instance's breaker refused, sent at once to another instance):"
    );
    let _ = writeln!(
        out,
        "| caller → upstream | requests | ok | retries | rerouted | budget denials | timeouts | rejected (open) | p50 | p99 |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut denials = Vec::new();
    for (name, u) in o.upstreams.iter_mut() {
        if u.budget_denials > 0 {
            denials.push(format!("{name}: {}", u.budget_denials));
        }
        let (p50, p99) = (pct(&mut u.latencies, 0.5), pct(&mut u.latencies, 0.99));
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {:.1} ms | {:.1} ms |",
            u.requests,
            u.ok,
            u.retries,
            u.rerouted,
            u.budget_denials,
            u.timeouts,
            u.rejected,
            p50.as_secs_f64() * 1000.0,
            p99.as_secs_f64() * 1000.0,
        );
    }
    let _ = writeln!(out);
    let brownout = scen.users_brownout;
    let in_brownout = o.upstreams.get("gateway → users").map_or(0, |u| {
        u.denied_at
            .iter()
            .filter(|t| in_window(**t, brownout))
            .count()
    });
    let _ = writeln!(
        out,
        "retry budget (one per stack): retries denied: {}.",
        if denials.is_empty() {
            "none".to_owned()
        } else {
            denials.join(", ")
        },
    );
    let _ = writeln!(
        out,
        "  The users brownout ({:.1}-{:.1} s: every other call fails, never enough in a row to open the breaker) asks for a retry of every other call; {in_brownout} of the gateway's retries to users were denied in it, so retries could not double the load on a struggling service.",
        brownout.0.as_secs_f64(),
        brownout.1.as_secs_f64(),
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "breakers, one per caller → upstream instance (one character per 250 ms: . closed, X open, ? half-open)"
    );
    let _ = writeln!(
        out,
        "  An open breaker half-opens on the first call after its open time (jittered by up to 10 %, doubling on repeated trips), not on a timer."
    );
    let slots = (elapsed.as_millis() / 250) as usize + 1;
    for (name, transitions) in o.breakers.iter() {
        let mut line = String::new();
        let mut state = "closed".to_owned();
        let mut k = 0;
        for s in 0..slots {
            let t = Duration::from_millis(s as u64 * 250);
            while k < transitions.len() && transitions[k].0 <= t {
                state = transitions[k].2.clone();
                k += 1;
            }
            line.push(match state.as_str() {
                "open" => 'X',
                "half_open" => '?',
                _ => '.',
            });
        }
        let moves: Vec<String> = transitions
            .iter()
            .map(|(t, from, to)| format!("{from}→{to} @{:.1}s", t.as_secs_f64()))
            .collect();
        let _ = writeln!(out, "  {name:<26} {line}  {}", moves.join(", "));
    }
    if o.breakers.is_empty() {
        let _ = writeln!(out, "  (no breaker moved)");
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
    let _ = writeln!(
        out,
        "gateway /metrics: the gateway's own steadfast_* series (every stack in this process reports to one registry; its breaker/retry label says whose a series is):"
    );
    for line in metrics_text.lines().filter(|l| {
        l.starts_with("steadfast_")
            && !l.contains("_bucket")
            && (l.contains("breaker=\"gateway") || l.contains("retry=\"gateway"))
    }) {
        let _ = writeln!(out, "  {line}");
    }
    Report {
        text: out,
        driver_ok,
        driver_total,
        traced_hops,
    }
}
