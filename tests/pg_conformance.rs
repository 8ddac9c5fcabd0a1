//! Promise: `PgStore` passes the whole conformance kit (`duraflow_rs::testkit`), reopened by
//! connecting again to the same schema, with the kit's futures on a current-thread tokio
//! runtime (the store's work runs on its own runtime).

#![cfg(all(feature = "postgres", feature = "testkit"))]

mod common;

use common::pg::{fresh_schema, pg_url};
use duraflow_rs::testkit;
use duraflow_rs::{PgConfig, PgStore};

#[tokio::test(flavor = "current_thread")]
async fn pg_store_passes_every_check_and_keeps_its_values_and_runs_across_reopens() {
    let Some(url) = pg_url("pg_conformance") else {
        return;
    };
    let schema = fresh_schema("conformance");
    let open = || {
        pollster::block_on(PgStore::connect_with(
            &url,
            PgConfig::default().schema(&schema),
        ))
    };
    let report = testkit::check_durable_store(open).await.unwrap();
    println!("{report}");
    assert_eq!(report.skipped().count(), 0, "{report}");
    assert_eq!(report.passed().count(), 8, "{report}");
}
