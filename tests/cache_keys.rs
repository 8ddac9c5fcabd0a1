//! Promise: a task added with `add_keyed` reuses its stored output only while it was made
//! from the same parameters, code version and consumed outputs, and within its maximum
//! age; a task that runs again and produces the same value leaves its dependents cached
//! (early cutoff); `explain`, asked before a run, says what the run then does and why; the
//! reason is in each attempt record. Plain `add` keeps the id-only rule. Over MemoryStore
//! and SledStore.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dagx::{task, DagRunner, Task};
use duraflow_rs::{Context, DurableDag, DuraflowError, MemoryStore, RunHistory, SledStore};
use serde::Serialize;

/// Which task bodies ran, by id.
type Ran = Arc<Mutex<Vec<String>>>;

/// Makes `n` rows; `label` is a parameter that does not change the output.
#[derive(Clone, Serialize)]
struct Load {
    n: u64,
    label: &'static str,
    #[serde(skip)]
    ran: Ran,
}
#[task]
impl Load {
    async fn run(&self) -> Vec<u64> {
        self.ran.lock().unwrap().push("load".into());
        (0..self.n).collect()
    }
}

/// Sums the rows, times `scale`.
#[derive(Clone, Serialize)]
struct Sum {
    scale: u64,
    #[serde(skip)]
    ran: Ran,
}
#[task]
impl Sum {
    // `#[task]` takes the input type from the parameter, so it must be `&Vec<u64>`.
    #[allow(clippy::ptr_arg)]
    async fn run(&self, rows: &Vec<u64>) -> u64 {
        self.ran.lock().unwrap().push("sum".into());
        rows.iter().sum::<u64>() * self.scale
    }
}

/// One round's settings.
#[derive(Clone)]
struct Round {
    n: u64,
    label: &'static str,
    scale: u64,
    code: &'static str,
    max_age: Option<Duration>,
}

const FIRST: Round = Round {
    n: 10,
    label: "a",
    scale: 1,
    code: "1",
    max_age: None,
};

/// What one round saw: the explain plan (id → (will run, reason)), what ran, and `sum`.
struct Seen {
    plan: BTreeMap<String, (bool, String)>,
    ran: Vec<String>,
    sum: u64,
}

/// Explains, then runs, the two-stage DAG over `ctx` as `round` says.
async fn round(ctx: &Arc<Context>, round: &Round) -> Seen {
    let ran: Ran = Arc::default();
    let dag = DagRunner::new();
    let mut d = DurableDag::new(&dag, ctx.clone()).with_code_version(round.code);
    if let Some(max) = round.max_age {
        d = d.with_max_age(max);
    }
    let load = d.add_keyed(
        "load",
        Load {
            n: round.n,
            label: round.label,
            ran: ran.clone(),
        },
    );
    let sum = d
        .add_keyed(
            "sum",
            Sum {
                scale: round.scale,
                ran: ran.clone(),
            },
        )
        .depends_on(&load);
    let plan = d.explain().await.unwrap();
    let ids: Vec<&str> = plan.iter().map(|e| e.id()).collect();
    assert_eq!(ids, ["load", "sum"], "in the order added");
    let plan = plan
        .iter()
        .map(|e| (e.id().to_owned(), (e.will_run(), e.to_string())))
        .collect();
    dag.run(|f| {
        tokio::spawn(f);
    })
    .await
    .unwrap();
    let ran = ran.lock().unwrap().clone();
    Seen {
        plan,
        ran,
        sum: dag.get(sum).unwrap(),
    }
}

/// The plan said what the run did: a task said to be cached did not run, and one said to
/// run did, unless it waited on an upstream (early cutoff may keep it cached).
fn agrees(seen: &Seen) {
    for (id, (will_run, why)) in &seen.plan {
        let ran = seen.ran.contains(id);
        if !will_run {
            assert!(!ran, "{id}: explained as {why:?}, but it ran");
        } else if !why.starts_with("upstream") {
            assert!(ran, "{id}: explained as {why:?}, but it did not run");
        }
    }
}

fn why<'a>(seen: &'a Seen, id: &str) -> &'a str {
    &seen.plan[id].1
}

async fn every_change_is_seen(ctx: Arc<Context>) {
    let expected = |n: u64, scale: u64| (0..n).sum::<u64>() * scale;

    let seen = round(&ctx, &FIRST).await;
    agrees(&seen);
    assert_eq!(why(&seen, "load"), "never stored");
    assert_eq!((seen.ran.len(), seen.sum), (2, expected(10, 1)));

    let seen = round(&ctx, &FIRST).await;
    agrees(&seen);
    assert_eq!(
        (why(&seen, "load"), why(&seen, "sum")),
        ("cached", "cached")
    );
    assert!(seen.ran.is_empty());

    // A parameter of the second stage.
    let scaled = Round { scale: 3, ..FIRST };
    let seen = round(&ctx, &scaled).await;
    agrees(&seen);
    assert_eq!(
        (why(&seen, "load"), why(&seen, "sum")),
        ("cached", "parameters changed")
    );
    assert_eq!(
        (seen.ran.clone(), seen.sum),
        (vec!["sum".to_owned()], expected(10, 3))
    );

    // The code version: both stages.
    let bumped = Round {
        code: "2",
        ..scaled.clone()
    };
    let seen = round(&ctx, &bumped).await;
    agrees(&seen);
    assert_eq!(why(&seen, "load"), "code version \"1\" → \"2\"");
    assert!(
        why(&seen, "sum").starts_with("upstream `load` will run"),
        "{}",
        why(&seen, "sum")
    );
    assert_eq!(
        seen.ran.len(),
        2,
        "sum too: load ran, with the same output, but sum's code changed"
    );

    // An upstream output that changes: the second stage runs on it.
    let more = Round {
        n: 20,
        ..bumped.clone()
    };
    let seen = round(&ctx, &more).await;
    agrees(&seen);
    assert_eq!(why(&seen, "load"), "parameters changed");
    assert_eq!((seen.ran.len(), seen.sum), (2, expected(20, 3)));

    // Early cutoff: the upstream runs again and makes the same output.
    let relabelled = Round {
        label: "b",
        ..more.clone()
    };
    let seen = round(&ctx, &relabelled).await;
    agrees(&seen);
    assert_eq!(why(&seen, "load"), "parameters changed");
    assert_eq!(
        (seen.ran.clone(), seen.sum),
        (vec!["load".to_owned()], expected(20, 3)),
        "sum stays cached"
    );
}

#[tokio::test]
async fn every_change_is_seen_over_a_memory_store() {
    every_change_is_seen(Arc::new(Context::new(MemoryStore::new()))).await;
}

#[tokio::test]
async fn every_change_is_seen_over_sled_and_recorded_in_each_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(dir.path().join("s")).unwrap());
    every_change_is_seen(Arc::new(Context::new(store.clone()))).await;
    // The reasons are in the attempts, newest last.
    let reasons: Vec<Option<String>> = common::wait(store.attempts_of("sum"))
        .unwrap()
        .into_iter()
        .map(|a| a.reason)
        .collect();
    assert_eq!(
        reasons.first().cloned().flatten().as_deref(),
        Some("never stored")
    );
    assert!(
        reasons.contains(&Some("parameters changed".to_owned())),
        "{reasons:?}"
    );
    assert!(reasons.contains(&Some("cached".to_owned())), "{reasons:?}");
}

#[tokio::test(start_paused = true)]
async fn outputs_expire_after_their_maximum_age_on_tokios_clock() {
    let ctx = Arc::new(Context::new(MemoryStore::new()));
    let day = Round {
        max_age: Some(Duration::from_secs(86_400)),
        ..FIRST
    };
    round(&ctx, &day).await;
    tokio::time::advance(Duration::from_secs(3_600)).await;
    let seen = round(&ctx, &day).await;
    agrees(&seen);
    assert!(seen.ran.is_empty(), "an hour old: cached");
    tokio::time::advance(Duration::from_secs(2 * 86_400)).await;
    let seen = round(&ctx, &day).await;
    agrees(&seen);
    assert!(
        why(&seen, "load").starts_with("expired"),
        "{}",
        why(&seen, "load")
    );
    assert_eq!(seen.ran.len(), 2);
}

#[tokio::test]
async fn plain_add_keeps_the_cached_value_and_a_switch_to_add_keyed_recomputes_once() {
    let ctx = Arc::new(Context::new(MemoryStore::new()));
    let plain = |n: u64| {
        let ctx = ctx.clone();
        async move {
            let ran: Ran = Arc::default();
            let dag = DagRunner::new();
            let d = DurableDag::new(&dag, ctx);
            let load = d.add(
                "load",
                Load {
                    n,
                    label: "a",
                    ran: ran.clone(),
                },
            );
            let plan = d.explain().await.unwrap();
            dag.run(|f| {
                tokio::spawn(f);
            })
            .await
            .unwrap();
            let value: Vec<u64> = dag.get(load).unwrap();
            let runs = ran.lock().unwrap().len();
            (plan[0].to_string(), runs, value.len())
        }
    };
    assert_eq!(plain(3).await, ("never stored".to_owned(), 1, 3));
    // The id-only rule: a change of parameters still returns what is stored.
    let (reason, ran, len) = plain(5).await;
    assert_eq!((ran, len), (0, 3));
    assert_eq!(reason, "no fingerprint (added with `add`: cached by id)");

    let keyed = Round { n: 3, ..FIRST };
    let seen = round(&ctx, &keyed).await;
    agrees(&seen);
    assert_eq!(
        why(&seen, "load"),
        "stored without a fingerprint (by `add`)"
    );
    assert!(seen.ran.contains(&"load".to_owned()));
    let seen = round(&ctx, &keyed).await;
    assert!(seen.ran.is_empty(), "once only");
}

/// Parameters serde cannot serialise.
#[derive(Clone)]
struct Unserialisable;
impl Serialize for Unserialisable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("no form for this"))
    }
}
#[task]
impl Unserialisable {
    async fn run(&self) -> u64 {
        1
    }
}

#[tokio::test]
async fn parameters_that_do_not_serialise_are_a_typed_error_not_a_panic() {
    let ctx = Arc::new(Context::new(MemoryStore::new()));
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx.clone());
    match d.try_add_keyed("bad", Unserialisable) {
        Err(DuraflowError::Encode { key, .. }) => assert_eq!(key, "bad"),
        other => panic!("expected Encode, got {other:?}"),
    }
    let d = DurableDag::new(&dag, ctx);
    d.add_keyed("bad", Unserialisable);
    match d.explain().await {
        Err(DuraflowError::Encode { key, source, .. }) => {
            assert_eq!(key, "bad");
            assert!(source.to_string().contains("no form for this"), "{source}");
        }
        other => panic!("expected Encode, got {other:?}"),
    }
}

#[tokio::test]
async fn a_task_of_its_own_code_version_runs_again_alone_when_it_changes() {
    let ctx = Arc::new(Context::new(MemoryStore::new()));
    let run = |version: &'static str| {
        let ctx = ctx.clone();
        async move {
            let ran: Ran = Arc::default();
            let dag = DagRunner::new();
            let d = DurableDag::new(&dag, ctx).with_code_version("dag");
            let load = d.add_keyed(
                "load",
                Load {
                    n: 4,
                    label: "a",
                    ran: ran.clone(),
                },
            );
            let sum = Sum {
                scale: 2,
                ran: ran.clone(),
            };
            d.add_keyed("sum", sum)
                .with_code_version(version)
                .depends_on(&load);
            let plan: Vec<String> = d
                .explain()
                .await
                .unwrap()
                .iter()
                .map(|e| e.to_string())
                .collect();
            dag.run(|f| {
                tokio::spawn(f);
            })
            .await
            .unwrap();
            let ran = ran.lock().unwrap().clone();
            (plan, ran)
        }
    };
    run("1").await;
    let (plan, ran) = run("2").await;
    assert_eq!(plan, ["cached", "code version \"1\" → \"2\""]);
    assert_eq!(ran, ["sum"]);
}
