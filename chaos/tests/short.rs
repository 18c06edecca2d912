//! The chaos suite's short mode, as CI runs it: every scenario of the failure table against
//! the real processes under a light load; each must end with nothing lost and nothing stale,
//! and with every check of its own passed. (`scripts/chaos.sh` runs the full suite.)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_under_load_ends_with_nothing_lost_and_nothing_stale() {
    let opts = widget_chaos::ChaosOptions::short();
    let outcomes = widget_chaos::chaos(&opts, |o| {
        eprintln!(
            "{} {}: {} lost, {} stale",
            if o.passed() { "PASS" } else { "FAIL" },
            o.scenario,
            o.lost,
            o.stale
        );
        // A failure must say why in CI's log, not only that it failed.
        for problem in &o.problems {
            eprintln!("  problem: {problem}");
        }
        for check in o.checks.iter().filter(|c| !c.ok) {
            eprintln!("  check failed: {}: {}", check.what, check.detail);
        }
    })
    .await
    .expect("the suite runs");
    println!("{}", widget_chaos::report::chaos_table(&outcomes));
    let checks = widget_chaos::report::chaos_checks(&outcomes);
    println!("{checks}");
    assert_eq!(
        outcomes.len(),
        widget_chaos::scenarios::ALL.len(),
        "every scenario ran"
    );
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.passed())
        .map(|o| o.scenario.as_str())
        .collect();
    assert!(failed.is_empty(), "failed: {failed:?}\n{checks}");
    // The figures must show that the faults did what they are meant to.
    let get = |name: &str| {
        outcomes
            .iter()
            .find(|o| o.scenario == name)
            .expect("scenario ran")
    };
    assert!(
        get("redis-restart-empty").replayed > 0,
        "rows replayed after Redis lost its data"
    );
    assert!(get("ingester-pause").reclaimed > 0, "entries reclaimed");
    assert!(
        get("bad-events").dead_lettered > 0,
        "bad events dead-lettered"
    );
    assert!(
        outcomes.iter().all(|o| o.produced > 0),
        "writes went on in every scenario"
    );
}
