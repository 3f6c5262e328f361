//! Terminals and merchants: in PostgreSQL, seeded from `config/terminals.toml`
//! and imported in bulk from CSV (`switchyard terminals import`).

use std::collections::HashMap;
use std::path::Path;

use settings::{Problem, Problems, Section};
use sqlx::PgPool;

/// A terminal with its merchant, as a request needs them.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Terminal {
    /// F41.
    pub id: String,
    /// Whether the terminal may transact.
    pub enabled: bool,
    /// The open batch (F60.2).
    pub batch: i32,
    /// F42 of its merchant.
    pub merchant_id: String,
    /// The merchant's name (F43 on the network side).
    pub merchant_name: String,
    /// The merchant category code (F18).
    pub mcc: String,
    /// Whether the merchant may transact.
    pub merchant_enabled: bool,
    /// Whether it ever signed on: the switch assigns the batch at sign-on,
    /// so before it the terminal has none to name.
    pub signed_on: bool,
    /// The working keys of its last sign-on as F62 carried them (under its
    /// master key, with check values): `None` when it holds none (K3).
    pub working_keys: Option<Vec<u8>>,
}

/// Looks a terminal up with its merchant.
pub async fn find(pool: &PgPool, id: &str) -> Result<Option<Terminal>, sqlx::Error> {
    Ok(find_many(pool, &[id.to_string()]).await?.pop().flatten())
}

/// The columns of a [`Terminal`], its merchant's joined as `m`.
const COLUMNS: &str =
    "t.id, t.enabled, t.batch, m.id AS merchant_id, m.name AS merchant_name, m.mcc,
     m.enabled AS merchant_enabled, t.signed_on_at IS NOT NULL AS signed_on, t.working_keys";

/// Looks many terminals up in one statement (the reads of concurrent
/// requests, batched): for each id, in order, the terminal when known.
pub async fn find_many(
    pool: &PgPool,
    ids: &[String],
) -> Result<Vec<Option<Terminal>>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM terminals t JOIN merchants m ON m.id = t.merchant_id
         WHERE t.id = ANY($1)"
    );
    let rows: Vec<Terminal> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(ids)
        .fetch_all(pool)
        .await?;
    let mut found: HashMap<String, Terminal> =
        rows.into_iter().map(|t| (t.id.clone(), t)).collect();
    Ok(ids.iter().map(|id| found.remove(id)).collect())
}

/// Records a sign-on and the working keys it hands out (`None`: none, and
/// the terminal's earlier ones are void); returns the terminal with its
/// merchant as they are now (the open batch is what the sign-on reply
/// carries).
pub async fn sign_on(
    pool: &PgPool,
    id: &str,
    working_keys: Option<&[u8]>,
) -> Result<Terminal, sqlx::Error> {
    let sql = format!(
        "UPDATE terminals t SET signed_on_at = now(), working_keys = $2 FROM merchants m
         WHERE t.id = $1 AND m.id = t.merchant_id
         RETURNING {COLUMNS}"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(working_keys)
        .fetch_one(pool)
        .await
}

/// A merchant to load. A value left `None` is one the file does not give:
/// a stored merchant keeps its own, a new merchant takes the default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MerchantRow {
    /// F42, 15 characters.
    pub id: String,
    /// Name (default empty).
    pub name: Option<String>,
    /// MCC, 4 digits (default 5999).
    pub mcc: Option<String>,
    /// May transact (default true).
    pub enabled: Option<bool>,
    /// The line of its file that gives it first, for problems.
    pub line: usize,
}

/// A terminal to load; `enabled` as in [`MerchantRow`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminalRow {
    /// F41, 8 characters.
    pub id: String,
    /// Its merchant.
    pub merchant_id: String,
    /// May transact (default true).
    pub enabled: Option<bool>,
}

/// The contents of a terminals file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fleet {
    /// Merchants.
    pub merchants: Vec<MerchantRow>,
    /// Terminals.
    pub terminals: Vec<TerminalRow>,
}

/// `T0000001`..`T0000100`: same prefix, a numeric suffix of the same width.
fn expand_range(first: &str, last: &str) -> Option<Vec<String>> {
    let split = |s: &str| {
        let at = s.len() - s.bytes().rev().take_while(u8::is_ascii_digit).count();
        (s[..at].to_string(), s[at..].to_string())
    };
    let (p1, n1) = split(first);
    let (p2, n2) = split(last);
    if p1 != p2 || n1.len() != n2.len() || n1.is_empty() {
        return None;
    }
    let (a, b): (u64, u64) = (n1.parse().ok()?, n2.parse().ok()?);
    if a > b || b - a > 1_000_000 {
        return None;
    }
    let width = n1.len();
    Some((a..=b).map(|n| format!("{p1}{n:0width$}")).collect())
}

/// The first id given a second time.
fn given_twice<'a>(ids: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let mut seen = std::collections::HashSet::new();
    ids.into_iter().find(|id| !seen.insert(*id))
}

fn is_mcc(mcc: &str) -> bool {
    mcc.len() == 4 && mcc.bytes().all(|b| b.is_ascii_digit())
}

fn check_id(s: &Section<'_, '_>, key: &str, id: &str, len: usize, what: &str) {
    if id.len() != len || !id.bytes().all(|b| (0x21..=0x7E).contains(&b)) {
        s.problem(
            key,
            format!("{id:?} is not a {what} ({len} printable characters)"),
        );
    }
}

impl Fleet {
    /// Reads a terminals file (`[[merchants]]`, `[[terminals]]` with `id` or
    /// `first`/`last`).
    pub fn load(path: &Path) -> Result<Fleet, Problems> {
        settings::load(path, Fleet::read)
    }

    /// Reads terminals-file text.
    pub fn parse(text: &str, origin: &str) -> Result<Fleet, Problems> {
        settings::parse(text, origin, Fleet::read)
    }

    fn read(root: &Section<'_, '_>) -> Fleet {
        let mut fleet = Fleet::default();
        // Where each id was first given, to name it when given again: the
        // database would refuse the file at start without a line.
        let mut merchant_in: HashMap<String, String> = HashMap::new();
        let mut terminal_in: HashMap<String, usize> = HashMap::new();
        for (i, m) in root.sections("merchants").into_iter().enumerate() {
            let id = m.string("id", "");
            check_id(&m, "id", &id, 15, "merchant id");
            match merchant_in.get(&id) {
                Some(first) => m.problem("id", format!("{id:?} is also {first}")),
                None => {
                    merchant_in.insert(id.clone(), format!("merchants[{i}] (line {})", m.line()));
                }
            }
            let mcc = m.str("mcc");
            if let Some(mcc) = mcc.as_ref().filter(|mcc| !is_mcc(mcc)) {
                m.problem(
                    "mcc",
                    format!("{mcc:?} is not a 4-digit merchant category code"),
                );
            }
            fleet.merchants.push(MerchantRow {
                id,
                name: m.str("name"),
                mcc,
                enabled: m.has("enabled").then(|| m.bool("enabled", true)),
                line: m.line(),
            });
        }
        let terminals = root.sections("terminals");
        for (i, t) in terminals.iter().enumerate() {
            let merchant_id = t.string("merchant", "");
            if !fleet.merchants.iter().any(|m| m.id == merchant_id) {
                t.problem(
                    "merchant",
                    format!("{merchant_id:?} is not one of the [[merchants]]"),
                );
            }
            let enabled = t.has("enabled").then(|| t.bool("enabled", true));
            let ids = match (t.str("id"), t.str("first"), t.str("last")) {
                (Some(id), None, None) => vec![id],
                (None, Some(first), Some(last)) => {
                    expand_range(&first, &last).unwrap_or_else(|| {
                        t.problem(
                            "last",
                            format!(
                                "{first:?}..{last:?} is not a range like \"T0000001\"..\"T0000100\""
                            ),
                        );
                        Vec::new()
                    })
                }
                _ => {
                    t.problem("id", "give either id, or first and last");
                    Vec::new()
                }
            };
            // A range may overlap an id or another range on many terminals:
            // one problem per earlier [[terminals]], with its first terminal.
            let mut overlaps: Vec<(usize, &str, usize)> = Vec::new();
            for id in &ids {
                match terminal_in.get(id) {
                    Some(&j) => match overlaps.iter_mut().find(|o| o.0 == j) {
                        Some(o) => o.2 += 1,
                        None => overlaps.push((j, id, 1)),
                    },
                    None => {
                        terminal_in.insert(id.clone(), i);
                    }
                }
            }
            for (j, id, count) in overlaps {
                let these = match count {
                    1 => format!("{id:?} is"),
                    n => format!("{id:?} and {} more are", n - 1),
                };
                let key = if t.has("id") { "id" } else { "first" };
                t.problem(
                    key,
                    format!(
                        "{these} also in terminals[{j}] (line {})",
                        terminals[j].line()
                    ),
                );
            }
            for id in ids {
                check_id(t, "id", &id, 8, "terminal id");
                fleet.terminals.push(TerminalRow {
                    id,
                    merchant_id: merchant_id.clone(),
                    enabled,
                });
            }
        }
        fleet
    }

    /// Reads a CSV of terminals: a header row `terminal_id,merchant_id`, and
    /// optionally `merchant_name`, `mcc`, `enabled`. A column left out, or
    /// an empty cell, gives nothing: what is stored stays as it is (see
    /// [`Fleet::store`]). A merchant without a name must be one the switch
    /// knows ([`Fleet::unknown_merchants`]). Errors name the line.
    pub fn from_csv(text: &str, origin: &str) -> Result<Fleet, Problems> {
        let mut fleet = Fleet::default();
        let mut problems = Vec::new();
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .from_reader(text.as_bytes());
        let problem = |line: usize, key: &str, message: String| Problem {
            origin: origin.to_string(),
            line,
            key: key.to_string(),
            message,
        };
        let headers = match reader.headers() {
            Ok(h) => h.clone(),
            Err(e) => return Err(Problems(vec![problem(1, "(header)", e.to_string())])),
        };
        let col = |name: &str| headers.iter().position(|h| h == name);
        let (Some(tid), Some(mid)) = (col("terminal_id"), col("merchant_id")) else {
            return Err(Problems(vec![problem(
                1,
                "(header)",
                "needs the columns terminal_id and merchant_id (and optionally merchant_name, mcc, enabled)".into(),
            )]));
        };
        let (name, mcc, enabled) = (col("merchant_name"), col("mcc"), col("enabled"));
        let mut merchant_at: HashMap<String, usize> = HashMap::new();
        // The line each terminal is first on: twice in one file is a mistake
        // to show, not one to let the database refuse without a line.
        let mut terminal_line: HashMap<String, usize> = HashMap::new();
        for record in reader.records() {
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    let line = e.position().map_or(0, |p| p.line() as usize);
                    problems.push(problem(line, "(row)", e.to_string()));
                    continue;
                }
            };
            let line = record.position().map_or(0, |p| p.line() as usize);
            let get = |i: Option<usize>| i.and_then(|i| record.get(i)).unwrap_or("").to_string();
            let terminal_id = get(Some(tid));
            let merchant_id = get(Some(mid));
            match terminal_line.get(&terminal_id) {
                Some(first) => problems.push(problem(
                    line,
                    "terminal_id",
                    format!("{terminal_id:?} is also on line {first}"),
                )),
                None => {
                    terminal_line.insert(terminal_id.clone(), line);
                }
            }
            if terminal_id.len() != 8 {
                problems.push(problem(
                    line,
                    "terminal_id",
                    format!("{terminal_id:?} is not 8 characters"),
                ));
            }
            if merchant_id.len() != 15 {
                problems.push(problem(
                    line,
                    "merchant_id",
                    format!("{merchant_id:?} is not 15 characters"),
                ));
            }
            // An empty cell gives nothing, as a missing column does.
            let given = |i: Option<usize>| Some(get(i)).filter(|v| !v.is_empty());
            let mcc_value = given(mcc);
            if let Some(m) = mcc_value.as_ref().filter(|m| !is_mcc(m)) {
                problems.push(problem(line, "mcc", format!("{m:?} is not 4 digits")));
            }
            let enabled_value = match get(enabled).as_str() {
                "" => None,
                "true" | "1" | "yes" => Some(true),
                "false" | "0" | "no" => Some(false),
                other => {
                    problems.push(problem(
                        line,
                        "enabled",
                        format!("{other:?} is not true or false"),
                    ));
                    None
                }
            };
            // A merchant's name and category may be on any of its rows, but
            // two rows may not say different things.
            let name_value = given(name);
            match merchant_at.get(&merchant_id) {
                Some(&i) => {
                    let m = &mut fleet.merchants[i];
                    for (key, had, given) in [
                        ("merchant_name", &mut m.name, name_value),
                        ("mcc", &mut m.mcc, mcc_value),
                    ] {
                        match (had.as_ref(), given) {
                            (Some(had), Some(given)) if *had != given => {
                                problems.push(problem(
                                    line,
                                    key,
                                    format!(
                                        "{given:?} differs from {had:?}, given earlier for merchant {merchant_id:?}"
                                    ),
                                ));
                            }
                            (None, given) => *had = given,
                            _ => {}
                        }
                    }
                }
                None => {
                    merchant_at.insert(merchant_id.clone(), fleet.merchants.len());
                    fleet.merchants.push(MerchantRow {
                        id: merchant_id.clone(),
                        name: name_value,
                        mcc: mcc_value,
                        enabled: None,
                        line,
                    });
                }
            }
            fleet.terminals.push(TerminalRow {
                id: terminal_id,
                merchant_id,
                enabled: enabled_value,
            });
        }
        if problems.is_empty() {
            Ok(fleet)
        } else {
            Err(Problems(problems))
        }
    }

    /// The merchants of a CSV fleet that the switch does not know and the
    /// file does not name, as problems at the line first giving each. An
    /// import adds a merchant only when a row gives its `merchant_name`: a
    /// mistyped merchant id is then refused, not a new merchant under
    /// category 5999 that the issuer sees in F18.
    pub async fn unknown_merchants(
        &self,
        pool: &PgPool,
        origin: &str,
    ) -> Result<Vec<Problem>, sqlx::Error> {
        let unnamed: Vec<&MerchantRow> =
            self.merchants.iter().filter(|m| m.name.is_none()).collect();
        let ids: Vec<&str> = unnamed.iter().map(|m| m.id.as_str()).collect();
        let known: Vec<String> = sqlx::query_scalar("SELECT id FROM merchants WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(pool)
            .await?;
        Ok(unnamed
            .into_iter()
            .filter(|m| !known.contains(&m.id))
            .map(|m| Problem {
                origin: origin.to_string(),
                line: m.line,
                key: "merchant_id".into(),
                message: format!(
                    "{:?} is not a merchant the switch knows (give its merchant_name to add it)",
                    m.id
                ),
            })
            .collect())
    }

    /// Writes the fleet in one transaction. What the fleet gives is
    /// written; what it leaves `None` keeps the stored value, and a new
    /// merchant or terminal takes the default. A terminal keeps its open
    /// batch.
    pub async fn store(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        // An upsert cannot do it, as `excluded` holds a defaulted value and
        // not whether one was given: new rows are inserted with the
        // defaults, stored ones take what is given. Rows that would not
        // change are not rewritten (the seed runs at every start).
        // Given twice, the update would take either row: refused, as both
        // files' readers refuse it with its lines.
        if let Some(id) = given_twice(self.merchants.iter().map(|m| m.id.as_str()))
            .or_else(|| given_twice(self.terminals.iter().map(|t| t.id.as_str())))
        {
            return Err(sqlx::Error::InvalidArgument(format!(
                "{id:?} is given twice in the fleet"
            )));
        }
        let mut tx = pool.begin().await?;
        let merchants = |f: fn(&MerchantRow) -> Option<String>| {
            self.merchants.iter().map(f).collect::<Vec<_>>()
        };
        let (ids, names, mccs) = (
            merchants(|m| Some(m.id.clone())),
            merchants(|m| m.name.clone()),
            merchants(|m| m.mcc.clone()),
        );
        let enabled: Vec<_> = self.merchants.iter().map(|m| m.enabled).collect();
        // New rows take the defaults; the UPDATE cannot see them (one
        // snapshot), so it changes the stored rows only.
        sqlx::query(
            "WITH g AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[])
                        AS g(id, name, mcc, enabled)),
                  added AS (INSERT INTO merchants (id, name, mcc, enabled)
                            SELECT id, coalesce(name, ''), coalesce(mcc, '5999'), coalesce(enabled, true)
                            FROM g
                            ON CONFLICT (id) DO NOTHING)
             UPDATE merchants m
             SET name = coalesce(g.name, m.name), mcc = coalesce(g.mcc, m.mcc),
                 enabled = coalesce(g.enabled, m.enabled)
             FROM g
             WHERE m.id = g.id
               AND (coalesce(g.name, m.name), coalesce(g.mcc, m.mcc), coalesce(g.enabled, m.enabled))
                   IS DISTINCT FROM (m.name, m.mcc, m.enabled)",
        )
        .bind(&ids)
        .bind(&names)
        .bind(&mccs)
        .bind(&enabled)
        .execute(&mut *tx)
        .await?;
        let ids: Vec<_> = self.terminals.iter().map(|t| t.id.clone()).collect();
        let merchant_ids: Vec<_> = self
            .terminals
            .iter()
            .map(|t| t.merchant_id.clone())
            .collect();
        let enabled: Vec<_> = self.terminals.iter().map(|t| t.enabled).collect();
        sqlx::query(
            "WITH g AS (SELECT * FROM unnest($1::text[], $2::text[], $3::bool[])
                        AS g(id, merchant_id, enabled)),
                  added AS (INSERT INTO terminals (id, merchant_id, enabled)
                            SELECT id, merchant_id, coalesce(enabled, true) FROM g
                            ON CONFLICT (id) DO NOTHING)
             UPDATE terminals t
             SET merchant_id = g.merchant_id, enabled = coalesce(g.enabled, t.enabled)
             FROM g
             WHERE t.id = g.id
               AND (g.merchant_id, coalesce(g.enabled, t.enabled)) IS DISTINCT FROM (t.merchant_id, t.enabled)",
        )
        .bind(&ids)
        .bind(&merchant_ids)
        .bind(&enabled)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_expand_with_their_width() {
        let ids = expand_range("T0000001", "T0000100").unwrap();
        assert_eq!(ids.len(), 100);
        assert_eq!(ids[0], "T0000001");
        assert_eq!(ids[99], "T0000100");
        assert!(expand_range("T0000002", "T0000001").is_none());
        assert!(expand_range("A0000001", "B0000002").is_none());
    }

    #[test]
    fn the_shipped_terminals_file_reads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/terminals.toml");
        let fleet = Fleet::load(&path).unwrap();
        assert_eq!(
            fleet.terminals.len(),
            1000,
            "as many as the shipped scenarios play"
        );
        assert_eq!(
            fleet.merchants[0].name.as_deref(),
            Some("Switchyard Demo Store")
        );
    }

    #[test]
    fn terminals_file_problems_are_named() {
        let text = "[[merchants]]\nid = \"898310048160001\"\nname = \"x\"\n[[terminals]]\nid = \"T1\"\nmerchant = \"898310048160001\"\n[[terminals]]\nid = \"T0000002\"\nmerchant = \"nobody\"\n";
        let problems = Fleet::parse(text, "t.toml").unwrap_err().to_string();
        assert!(
            problems.contains("t.toml:5: terminals[0].id: \"T1\" is not a terminal id"),
            "{problems}"
        );
        assert!(
            problems.contains(
                "t.toml:9: terminals[1].merchant: \"nobody\" is not one of the [[merchants]]"
            ),
            "{problems}"
        );
    }

    #[test]
    fn an_id_given_twice_in_a_terminals_file_is_named_with_both_places() {
        let text = r#"[[merchants]]
id = "898310048160001"

[[merchants]]
id = "898310048160002"

[[merchants]]
id = "898310048160001"

[[terminals]]
first = "T0000001"
last = "T0000100"
merchant = "898310048160001"

[[terminals]]
id = "T0000050"
merchant = "898310048160002"

[[terminals]]
first = "T0000091"
last = "T0000110"
merchant = "898310048160002"
"#;
        let problems = Fleet::parse(text, "t.toml").unwrap_err().to_string();
        assert_eq!(
            problems.lines().collect::<Vec<_>>(),
            [
                "t.toml:8: merchants[2].id: \"898310048160001\" is also merchants[0] (line 1)",
                "t.toml:16: terminals[1].id: \"T0000050\" is also in terminals[0] (line 10)",
                "t.toml:20: terminals[2].first: \"T0000091\" and 9 more are also in terminals[0] (line 10)",
            ]
        );
    }

    #[test]
    fn csv_rows_with_problems_name_their_line() {
        let text = "terminal_id,merchant_id,merchant_name,mcc,enabled\nT0000001,898310048160001,Shop,5411,true\nT2,898310048160001,Shop,54x1,maybe\n";
        let problems = Fleet::from_csv(text, "f.csv").unwrap_err().to_string();
        assert!(
            problems.contains("f.csv:3: terminal_id: \"T2\" is not 8 characters"),
            "{problems}"
        );
        assert!(
            problems.contains("f.csv:3: mcc: \"54x1\" is not 4 digits"),
            "{problems}"
        );
        assert!(
            problems.contains("f.csv:3: enabled: \"maybe\" is not true or false"),
            "{problems}"
        );
        let twice = "terminal_id,merchant_id\nT0000001,898310048160001\nT0000002,898310048160001\nT0000001,898310048160002\n";
        let problems = Fleet::from_csv(twice, "f.csv").unwrap_err().to_string();
        assert_eq!(
            problems,
            "f.csv:4: terminal_id: \"T0000001\" is also on line 2"
        );
        let differ = "terminal_id,merchant_id,merchant_name,mcc\nT0000001,898310048160001,,5411\nT0000002,898310048160001,Shop,5812\nT0000003,898310048160001,Shop,\n";
        let problems = Fleet::from_csv(differ, "f.csv").unwrap_err().to_string();
        assert_eq!(
            problems,
            "f.csv:3: mcc: \"5812\" differs from \"5411\", given earlier for merchant \"898310048160001\""
        );
        let ok = Fleet::from_csv(
            "terminal_id,merchant_id\nT0000001,898310048160001\n",
            "g.csv",
        )
        .unwrap();
        assert_eq!(ok.terminals.len(), 1);
        // Nothing given: the default is for a new merchant only.
        assert_eq!(ok.merchants[0].mcc, None);
    }
}
