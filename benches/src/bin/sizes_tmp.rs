#![allow(missing_docs)]
use bytes::Bytes;
use http_body_util::Empty;
use steadfast_bench::Bare;
use tower::{Layer, Service};
fn req() -> http::Request<Empty<Bytes>> {
    http::Request::new(Empty::new())
}
fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _g = rt.enter();
    let mut a =
        steadfast::timeout::TimeoutLayer::new(std::time::Duration::from_secs(5)).layer(Bare);
    println!("attempt fut {}", std::mem::size_of_val(&a.call(req())));
    let mut b = steadfast::breaker::CircuitBreakerLayer::builder()
        .build_per_authority()
        .unwrap()
        .layer(a.clone());
    println!("breaker fut {}", std::mem::size_of_val(&b.call(req())));
    let stack = steadfast::client::http().build().unwrap();
    let mut s = stack.layer(Bare);
    println!("stack fut {}", std::mem::size_of_val(&s.call(req())));
    println!("stack svc {}", std::mem::size_of_val(&s));
    println!("parts {}", std::mem::size_of::<http::request::Parts>());
    let mut r = steadfast::retry::RetryLayer::new().layer(b.clone());
    println!("retry fut {}", std::mem::size_of_val(&r.call(req())));
    println!("retry svc {}", std::mem::size_of_val(&r));
    println!("breaker svc {}", std::mem::size_of_val(&b));
}
