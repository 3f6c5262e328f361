//! Storing a fleet (the terminals file at start, a CSV import): what a file
//! gives is written, what it leaves out stays as stored.

use super::*;
use switch::terminals::{self, Fleet};

/// A database with the switch's schema and nothing in it.
async fn empty() -> PgPool {
    let pool = switch::connect(&embedded_pg::test_database().await, 2)
        .await
        .unwrap();
    switch::migrate(&pool).await.unwrap();
    pool
}

async fn store(pool: &PgPool, toml: &str) {
    Fleet::parse(toml, "terminals.toml")
        .unwrap()
        .store(pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_key_the_terminals_file_leaves_out_keeps_what_is_stored() {
    let pool = empty().await;
    store(
        &pool,
        "[[merchants]]\nid = \"898310048160001\"\nname = \"Corner Shop\"\nmcc = \"5411\"\n\
         [[terminals]]\nfirst = \"T0000001\"\nlast = \"T0000002\"\nmerchant = \"898310048160001\"\n",
    )
    .await;
    // Between two starts, the operator disables a terminal (an import, by hand).
    sqlx::query("UPDATE terminals SET enabled = false WHERE id = 'T0000002'")
        .execute(&pool)
        .await
        .unwrap();
    // A restart with a file that names the merchant only: the name, the
    // category and the disabled terminal stay; the new terminal takes the
    // defaults.
    store(
        &pool,
        "[[merchants]]\nid = \"898310048160001\"\n\
         [[terminals]]\nfirst = \"T0000001\"\nlast = \"T0000003\"\nmerchant = \"898310048160001\"\n",
    )
    .await;
    let t2 = terminals::find(&pool, "T0000002").await.unwrap().unwrap();
    assert!(!t2.enabled, "a restart re-enabled a disabled terminal");
    assert_eq!(t2.merchant_name, "Corner Shop");
    assert_eq!(t2.mcc, "5411");
    assert!(t2.merchant_enabled);
    let t3 = terminals::find(&pool, "T0000003").await.unwrap().unwrap();
    assert!(t3.enabled);
    // What the file does say is its declared state, and is written.
    store(
        &pool,
        "[[merchants]]\nid = \"898310048160001\"\nmcc = \"5812\"\nenabled = false\n\
         [[terminals]]\nid = \"T0000002\"\nmerchant = \"898310048160001\"\nenabled = true\n",
    )
    .await;
    let t2 = terminals::find(&pool, "T0000002").await.unwrap().unwrap();
    assert!(t2.enabled);
    assert_eq!(
        (
            t2.merchant_name.as_str(),
            t2.mcc.as_str(),
            t2.merchant_enabled
        ),
        ("Corner Shop", "5812", false)
    );
}

#[tokio::test]
async fn a_new_merchant_and_terminal_take_the_defaults() {
    let pool = empty().await;
    store(
        &pool,
        "[[merchants]]\nid = \"898310048160001\"\n\
         [[terminals]]\nid = \"T0000001\"\nmerchant = \"898310048160001\"\n",
    )
    .await;
    let t = terminals::find(&pool, "T0000001").await.unwrap().unwrap();
    assert_eq!(
        (
            t.enabled,
            t.merchant_name.as_str(),
            t.mcc.as_str(),
            t.merchant_enabled
        ),
        (true, "", "5999", true)
    );
}

#[tokio::test]
async fn a_fleet_built_in_code_with_a_terminal_twice_is_refused_unwritten() {
    let pool = empty().await;
    let mut fleet = Fleet::parse(
        "[[merchants]]\nid = \"898310048160001\"\n[[terminals]]\nid = \"T0000001\"\nmerchant = \"898310048160001\"\n",
        "terminals.toml",
    )
    .unwrap();
    fleet.terminals.push(fleet.terminals[0].clone());
    let refused = fleet.store(&pool).await.unwrap_err().to_string();
    assert!(refused.contains("\"T0000001\" is given twice"), "{refused}");
    let merchants: i64 = sqlx::query_scalar("SELECT count(*) FROM merchants")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(merchants, 0, "nothing written");
}
