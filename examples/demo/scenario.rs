//! The knobs of a run, and the run itself: start every service, drive the load, read what
//! was observed.

#[allow(unused_imports)]
use super::*;

/// The knobs of one run: `full()` is the README's demo, `small()` the scaled-down test.
#[derive(Clone, Debug)]
pub(crate) struct Scenario {
    pub(crate) load: Duration,
    pub(crate) rps: u64,
    pub(crate) spike: usize,
    pub(crate) attempt: Duration,
    pub(crate) total: Duration,
    pub(crate) open_time: Duration,
    pub(crate) users_down: (Duration, Duration),
    pub(crate) users_brownout: (Duration, Duration),
    pub(crate) budget: BudgetConfig,
    pub(crate) payments_bursts: Vec<(Duration, Duration)>,
    pub(crate) inventory_stall_every: u64,
    pub(crate) inventory_stall: Duration,
    /// The overload and slow-replica phases, after the main run.
    pub(crate) phases: Phases,
}

impl Scenario {
    pub(crate) fn full() -> Self {
        Self {
            load: Duration::from_secs(10),
            rps: 60,
            spike: 260,
            attempt: Duration::from_millis(300),
            total: Duration::from_millis(1500),
            open_time: Duration::from_secs(2),
            users_down: (Duration::from_secs(2), Duration::from_millis(3800)),
            users_brownout: (Duration::from_millis(6000), Duration::from_millis(8500)),
            // The gateway's stack for users, inventory and payments: retries may add 10 % to
            // recent traffic plus 1 a second (the default floor, 10 a second, is more than
            // this small load ever asks for). The other stacks keep the defaults.
            budget: BudgetConfig {
                ratio: 0.1,
                min_per_sec: 1,
                window: Duration::from_secs(5),
            },
            payments_bursts: vec![
                (Duration::from_millis(3000), Duration::from_millis(3600)),
                (Duration::from_millis(7000), Duration::from_millis(7500)),
            ],
            inventory_stall_every: 7,
            inventory_stall: Duration::from_millis(500),
            phases: Phases::full(),
        }
    }

    #[cfg(test)]
    pub(crate) fn small() -> Self {
        Self {
            load: Duration::from_secs(3),
            rps: 20,
            spike: 40,
            users_down: (Duration::from_millis(500), Duration::from_millis(1500)),
            users_brownout: (Duration::from_millis(1800), Duration::from_millis(2600)),
            payments_bursts: vec![(Duration::from_millis(800), Duration::from_millis(1200))],
            open_time: Duration::from_millis(500),
            phases: Phases::small(),
            ..Self::full()
        }
    }

    /// The client stack of the service `caller` (its name labels the stack's metrics and
    /// events), with the default retry budget.
    pub(crate) fn client(&self, caller: &str) -> HttpClientLayer {
        self.client_for(caller, &[], BudgetConfig::default())
    }

    /// The client stack; for a service of several instances when `endpoints` are given: each
    /// attempt balanced over them, instances that fail ejected for a while.
    pub(crate) fn client_for(
        &self,
        caller: &str,
        endpoints: &[String],
        budget: BudgetConfig,
    ) -> HttpClientLayer {
        let stack = steadfast::client::http()
            .name(caller)
            .attempt_timeout(self.attempt)
            .total_timeout(self.total)
            .retry(|r| {
                r.backoff(Backoff::new(
                    Duration::from_millis(50),
                    Duration::from_millis(500),
                ))
                .budget(Some(budget))
            })
            .breaker(|b| {
                b.open_time(self.open_time)
                    .max_open_time(self.open_time * 4)
            });
        let stack = if endpoints.is_empty() {
            stack
        } else {
            stack.balance(|b| {
                b.endpoints(endpoints)
                    .interval(self.open_time)
                    .ejection_time(self.open_time, self.open_time * 4)
                    .failure_percentage(Some(
                        FailurePercentage::default()
                            .threshold(30)
                            .minimum_hosts(3)
                            .request_volume(5),
                    ))
                    .max_ejection_percent(34)
            })
        };
        stack.build().expect("a valid client stack")
    }
}

pub(crate) async fn run(scen: Scenario) -> Report {
    let _ = start();
    // Histograms as Prometheus histograms (buckets, sum, count over the whole run), not
    // summaries, whose quantiles cover a recent window only while their sum covers the run.
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ])
        .expect("bucket bounds")
        .build_recorder();
    let handle = recorder.handle();
    let _ = metrics::set_global_recorder(recorder);
    steadfast::describe_metrics();
    let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Observer));

    let scen = Arc::new(scen);
    let users = serve(users(scen.clone())).await;
    let inventory = serve(inventory(scen.clone())).await;
    let payments = serve(payments(scen.clone())).await;
    for (addr, name) in [
        (users, "users"),
        (inventory, "inventory"),
        (payments, "payments"),
    ] {
        observed()
            .lock()
            .unwrap()
            .names
            .insert(addr.to_string(), name.to_owned());
    }
    let mut orders = Vec::new();
    for name in ["orders-1", "orders-2", "orders-3"] {
        let o = Orders {
            name,
            flaky: (name == "orders-3").then(Arc::default),
            client: Arc::new(scen.client(name)),
            transport: transport(),
            inventory,
            payments,
        };
        let app = Router::new()
            .route("/orders/{id}", post(place_order))
            .with_state(o)
            .layer(steadfast::server::http().build().expect("server stack"));
        let addr = serve(app).await;
        observed()
            .lock()
            .unwrap()
            .names
            .insert(addr.to_string(), name.to_owned());
        orders.push(addr.to_string());
    }
    let gw = serve(gateway(Gateway {
        client: Arc::new(scen.client_for("gateway", &[], scen.budget)),
        // A stack of its own (its breakers, budget and metrics apart from the other one).
        orders: Arc::new(scen.client_for("gateway-orders", &orders, BudgetConfig::default())),
        transport: transport(),
        users,
        inventory,
        payments,
        metrics: handle,
    }))
    .await;

    // The load driver: the outside world, a plain client.
    let driver: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    let statuses: Arc<Mutex<BTreeMap<u16, u64>>> = Arc::default();
    let traced: Arc<Mutex<Option<String>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    let total = scen.load.as_millis() as u64 * scen.rps / 1000;
    let tick = Duration::from_micros(1_000_000 / scen.rps);
    let began = Instant::now();
    for i in 0..total {
        tokio::time::sleep_until(began + tick * i as u32).await;
        let burst = if i == total / 2 { scen.spike } else { 1 };
        for j in 0..burst {
            let (driver, statuses, traced) = (driver.clone(), statuses.clone(), traced.clone());
            let n = i * 1000 + j as u64;
            let (method, path) = match (i + j as u64) % 20 {
                0..=4 => ("GET", format!("/api/v1/users/users/{n}")),
                5..=11 => ("POST", format!("/api/v1/orders/orders/{n}")),
                12..=15 => ("GET", format!("/api/v1/inventory/items/{n}")),
                _ => ("POST", "/api/v1/payments/charge".to_owned()),
            };
            tasks.spawn(async move {
                let id = format!("demo-{n}");
                let req = http::Request::builder()
                    .method(method)
                    .uri(format!("http://{gw}{path}"))
                    .header("x-correlation-id", &id)
                    .header("idempotency-key", &id)
                    .body(Body::empty())
                    .expect("request");
                let status = match driver.request(req).await {
                    Ok(res) => res.status().as_u16(),
                    Err(_) => 0,
                };
                *statuses.lock().unwrap().entry(status).or_default() += 1;
                if status == 200 && path.contains("/orders/") {
                    traced.lock().unwrap().get_or_insert(id);
                }
            });
        }
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = began.elapsed();

    // The gateway's own endpoints.
    let health = driver
        .request(
            http::Request::get(format!("http://{gw}/health"))
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    let metrics_text = match driver
        .request(
            http::Request::get(format!("http://{gw}/metrics"))
                .body(Body::empty())
                .expect("request"),
        )
        .await
    {
        Ok(res) => {
            let bytes = http_body_util::BodyExt::collect(res.into_body())
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            String::from_utf8_lossy(&bytes).into_owned()
        }
        Err(e) => format!("(metrics unavailable: {e})"),
    };

    let mut report = render(
        &scen,
        elapsed,
        health,
        &statuses.lock().unwrap(),
        traced.lock().unwrap().clone(),
        &metrics_text,
    );
    report.text.push('\n');
    report.text.push_str(&overload(&scen.phases).await);
    report.text.push('\n');
    report.text.push_str(&slow_replica(&scen.phases).await);
    report
}
