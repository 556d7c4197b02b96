//! Reading and writing the remaining deadline on the wire.

use std::time::Duration;

use http::header::Entry;
use http::{HeaderMap, HeaderName, HeaderValue};
use steadfast_core::header::{
    GRPC_TIMEOUT, encode_grpc_timeout, encode_timeout_ms, grpc_timeout, timeout_ms,
};
use steadfast_core::is_grpc_content_type;

/// The budget a request carries (see [`steadfast_core::header::budget`]).
pub(crate) use steadfast_core::header::budget as inbound;

/// A budget encoded once for both kinds of request.
#[derive(Clone, Debug)]
pub(crate) struct Encoded {
    http: HeaderValue,
    grpc: HeaderValue,
}

impl Encoded {
    pub(crate) fn new(budget: Duration) -> Self {
        Self {
            http: encode_timeout_ms(budget),
            grpc: encode_grpc_timeout(budget),
        }
    }
}

/// Writes `budget` onto an outgoing request: `grpc-timeout` for gRPC, the deadline header
/// (`x-request-timeout-ms` by default) otherwise; `encoded` is `budget` already encoded, when
/// the caller has it. A smaller value already on the request (set by the caller or an inner
/// layer) is kept: a budget only ever shrinks on its way downstream.
pub(crate) fn write(
    headers: &mut HeaderMap,
    budget: Duration,
    header: &HeaderName,
    encoded: Option<&Encoded>,
) {
    let grpc = is_grpc_content_type(headers);
    type Parse = fn(&HeaderValue) -> Option<Duration>;
    type Encode = fn(Duration) -> HeaderValue;
    let (name, parse, encode): (_, Parse, Encode) = if grpc {
        (&GRPC_TIMEOUT, grpc_timeout, encode_grpc_timeout)
    } else {
        (header, timeout_ms, encode_timeout_ms)
    };
    let value = || match encoded {
        Some(e) if grpc => e.grpc.clone(),
        Some(e) => e.http.clone(),
        None => encode(budget),
    };
    // One lookup: a value already there is kept if it is smaller, else replaced. A repeated
    // header leaves as one value, the one that counts: a server reading only the first must
    // not be told more than the budget (every other value goes, the invalid ones too).
    match headers.entry(name) {
        Entry::Occupied(mut e) => {
            let smallest = e
                .iter()
                .filter_map(|v| Some((parse(v)?, v)))
                .min_by_key(|(d, _)| *d);
            match smallest {
                Some((d, _)) if d <= budget && e.iter().nth(1).is_none() => {}
                Some((d, v)) if d <= budget => {
                    let kept = v.clone();
                    e.insert(kept);
                }
                _ => {
                    e.insert(value());
                }
            }
        }
        Entry::Vacant(e) => {
            e.insert(value());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use steadfast_core::header::{FEW_NAMES, TIMEOUT_MS};

    #[test]
    fn inbound_prefers_valid_grpc_timeout() {
        let mut h = HeaderMap::new();
        h.insert(TIMEOUT_MS, "900".parse().unwrap());
        assert_eq!(inbound(&h, &TIMEOUT_MS), Some(Duration::from_millis(900)));
        h.insert(GRPC_TIMEOUT, "2S".parse().unwrap());
        assert_eq!(inbound(&h, &TIMEOUT_MS), Some(Duration::from_secs(2)));
        // What a caller wrote on an outgoing request counts by the shorter of the two.
        assert_eq!(
            steadfast_core::header::carried_budget(&h, &TIMEOUT_MS),
            Some(Some(Duration::from_millis(900)))
        );
        h.insert(GRPC_TIMEOUT, "123456789S".parse().unwrap());
        assert_eq!(
            inbound(&h, &TIMEOUT_MS),
            Some(Duration::from_millis(900)),
            "bad grpc-timeout ignored"
        );
        h.insert(TIMEOUT_MS, "-1".parse().unwrap());
        assert_eq!(inbound(&h, &TIMEOUT_MS), None);
    }

    #[test]
    fn a_repeated_header_counts_by_its_shortest_valid_value() {
        let mut h = HeaderMap::new();
        h.append(TIMEOUT_MS, "100000".parse().unwrap());
        h.append(TIMEOUT_MS, "abc".parse().unwrap());
        h.append(TIMEOUT_MS, "5000".parse().unwrap());
        assert_eq!(inbound(&h, &TIMEOUT_MS), Some(Duration::from_secs(5)));
        let mut g = HeaderMap::new();
        g.append(GRPC_TIMEOUT, "x".parse().unwrap());
        g.append(GRPC_TIMEOUT, "2S".parse().unwrap());
        assert_eq!(inbound(&g, &TIMEOUT_MS), Some(Duration::from_secs(2)));
    }

    /// Every mix of up to two fields of each header, from a set with valid, invalid and
    /// competing values: one pass over a small map and the lookups over a big one agree.
    #[test]
    fn one_pass_and_lookups_agree() {
        let grpc: &[&str] = &["2S", "900m", "x", "123456789S"];
        let ms: &[&str] = &["900", "5000", "-1", "abc"];
        let picks = |n: usize| (0..n).flat_map(move |a| (0..=n).map(move |b| (a, b)));
        let mut cases = 0;
        for g in 0..=2usize {
            for m in 0..=2usize {
                for (ga, gb) in picks(grpc.len()) {
                    for (ma, mb) in picks(ms.len()) {
                        let mut small = HeaderMap::new();
                        let vals = |k: usize, a: usize, b: usize, pool: &[&'static str]| {
                            [a, b.min(pool.len() - 1)][..k]
                                .iter()
                                .map(|i| pool[*i])
                                .collect::<Vec<_>>()
                        };
                        for v in vals(m, ma, mb, ms) {
                            small.append(TIMEOUT_MS, HeaderValue::from_static(v));
                        }
                        for v in vals(g, ga, gb, grpc) {
                            small.append(GRPC_TIMEOUT, HeaderValue::from_static(v));
                        }
                        let mut big = small.clone();
                        for i in 0..=FEW_NAMES {
                            let name = HeaderName::from_bytes(format!("x-pad-{i}").as_bytes());
                            big.insert(name.unwrap(), HeaderValue::from_static("1"));
                        }
                        assert!(small.keys_len() <= FEW_NAMES && big.keys_len() > FEW_NAMES);
                        assert_eq!(
                            inbound(&small, &TIMEOUT_MS),
                            inbound(&big, &TIMEOUT_MS),
                            "{small:?}"
                        );
                        cases += 1;
                    }
                }
            }
        }
        assert!(cases > 1000);
    }

    #[test]
    fn write_only_shrinks() {
        let mut h = HeaderMap::new();
        write(&mut h, Duration::from_millis(1500), &TIMEOUT_MS, None);
        assert_eq!(h[TIMEOUT_MS], "1500");
        write(&mut h, Duration::from_secs(5), &TIMEOUT_MS, None);
        assert_eq!(h[TIMEOUT_MS], "1500");
        let ten = Encoded::new(Duration::from_millis(10));
        write(&mut h, Duration::from_millis(10), &TIMEOUT_MS, Some(&ten));
        assert_eq!(h[TIMEOUT_MS], "10");
        // A repeated header: its smallest valid value counts, and leaves as the only one (a
        // server reading the first value alone would have read 10 ms here, or any other).
        h.append(TIMEOUT_MS, "7".parse().unwrap());
        write(&mut h, Duration::from_millis(8), &TIMEOUT_MS, None);
        assert_eq!(
            h.get_all(TIMEOUT_MS).iter().collect::<Vec<_>>(),
            ["7"],
            "7 < 8 kept alone"
        );
        h.insert(TIMEOUT_MS, "99000".parse().unwrap());
        h.append(TIMEOUT_MS, "x".parse().unwrap());
        h.append(TIMEOUT_MS, "6".parse().unwrap());
        write(&mut h, Duration::from_millis(8), &TIMEOUT_MS, None);
        assert_eq!(h.get_all(TIMEOUT_MS).iter().collect::<Vec<_>>(), ["6"]);
        write(&mut h, Duration::from_millis(3), &TIMEOUT_MS, None);
        assert_eq!(h.get_all(TIMEOUT_MS).iter().collect::<Vec<_>>(), ["3"]);

        let mut g = HeaderMap::new();
        g.insert("content-type", "application/grpc".parse().unwrap());
        g.insert(GRPC_TIMEOUT, "garbage".parse().unwrap());
        write(&mut g, Duration::from_secs(1), &TIMEOUT_MS, None);
        assert_eq!(g[GRPC_TIMEOUT], "1000000u");
        assert!(g.get(TIMEOUT_MS).is_none());
    }
}
