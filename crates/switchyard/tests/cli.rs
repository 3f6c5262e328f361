//! The binary's commands, run as a user runs them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn switchyard(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    if let Some(text) = stdin {
        // A command that refuses its arguments exits before it reads its
        // input; the pipe it closed is its answer, not the test's failure.
        match child.stdin.take().unwrap().write_all(text.as_bytes()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            written => written.unwrap(),
        }
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

/// A child process killed when the test ends, however it ends: a failed
/// assertion would otherwise leave a serving demo (and its PostgreSQL)
/// running after the suite.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    /// Sends SIGTERM and waits for the exit, at most 30 s: a process that
    /// ignores it fails the test, not the suite.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(exit) = self.0.try_wait().unwrap() {
                return exit;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "SIGTERM did not stop it within 30 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl std::ops::Deref for Running {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

fn fixture_dir(dialect: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../iso8583/tests/fixtures")
        .join(dialect)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn decode_then_encode_gives_back_every_fixture_frame() {
    for dialect in ["cup-pos", "iso87"] {
        let mut seen = 0;
        for entry in std::fs::read_dir(fixture_dir(dialect)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "hex") {
                continue;
            }
            let hex = std::fs::read_to_string(&path).unwrap();
            let expected: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(path.with_extension("json")).unwrap(),
            )
            .unwrap();
            let decoded = stdout(&switchyard(
                &[
                    "decode",
                    "--dialect",
                    dialect,
                    "--hex",
                    hex.trim(),
                    "--reveal",
                ],
                None,
            ));
            assert_eq!(decoded.lines().count(), 1, "one line of JSON");
            let json: serde_json::Value = serde_json::from_str(&decoded).unwrap();
            assert_eq!(json, expected, "{}", path.display());
            let encoded = stdout(&switchyard(
                &["encode", "--dialect", dialect],
                Some(&decoded),
            ));
            assert_eq!(encoded.trim(), hex.trim(), "{}", path.display());
            seen += 1;
        }
        assert!(seen > 20, "{dialect}: {seen} fixtures");
    }
}

#[test]
fn decode_masks_card_data_unless_revealed() {
    let hex = std::fs::read_to_string(fixture_dir("cup-pos").join("purchase.request.hex")).unwrap();
    let out = stdout(&switchyard(
        &["decode", "--dialect", "cup-pos", "--hex", hex.trim()],
        None,
    ));
    assert!(out.starts_with(
        r#"{"tpdu": "6000030000", "header": "603100000000", "mti": "0200", "fields": {"2": "622202*********0001", "3": "000000""#
    ), "{out}");
    assert!(!out.contains("6222020000000000001"), "{out}");
    // Without the length prefix, and from a file, it reads the same.
    let file = std::env::temp_dir().join(format!("sy-frame-{}.bin", std::process::id()));
    std::fs::write(&file, hex::decode(&hex.trim()[4..]).unwrap()).unwrap();
    let from_file = stdout(&switchyard(
        &[
            "decode",
            "--dialect",
            "cup-pos",
            "--file",
            file.to_str().unwrap(),
        ],
        None,
    ));
    std::fs::remove_file(&file).unwrap();
    assert_eq!(from_file, out);
}

#[test]
fn decode_masks_the_pans_of_batch_upload_records_and_emv_card_tags() {
    let decode = |hex: &str| -> serde_json::Value {
        let out = stdout(&switchyard(
            &["decode", "--dialect", "cup-pos", "--hex", hex.trim()],
            None,
        ));
        serde_json::from_str(&out).unwrap()
    };
    let upload =
        std::fs::read_to_string(fixture_dir("cup-pos").join("batch-upload.request.hex")).unwrap();
    assert_eq!(
        decode(&upload)["fields"]["48"],
        "02000000040622202*********0001000000001000000000050000621700******0000000000002550"
    );
    // Settlement totals in the same field are shown as they are.
    let settlement =
        std::fs::read_to_string(fixture_dir("cup-pos").join("settlement.request.hex")).unwrap();
    let totals: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir("cup-pos").join("settlement.request.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(decode(&settlement)["fields"]["48"], totals["fields"]["48"]);
    // A chip purchase whose F55 carries the PAN (5A) and track 2 (57):
    // the cryptogram stays readable, the card data does not.
    let mut chip: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir("cup-pos").join("purchase.request.json")).unwrap(),
    )
    .unwrap();
    chip["fields"]["55"] =
        "9F26088A1F2E3D4C5B6A795A086222020000000001570B6222020000000001D2912F".into();
    let frame = stdout(&switchyard(
        &["encode", "--dialect", "cup-pos"],
        Some(&chip.to_string()),
    ));
    let f55 = decode(&frame)["fields"]["55"].as_str().unwrap().to_string();
    assert_eq!(
        f55,
        format!(
            "9F26088A1F2E3D4C5B6A795A08{}570B{}",
            "*".repeat(16),
            "*".repeat(22)
        )
    );
}

#[test]
fn a_malformed_frame_exits_2_with_one_line_naming_field_and_offset() {
    let hex = std::fs::read_to_string(fixture_dir("cup-pos").join("purchase.request.hex")).unwrap();
    let mut bytes = hex::decode(hex.trim()).unwrap();
    // F2's length prefix sits right after length, TPDU, header, MTI and bitmap.
    let f2 = 2 + 5 + 6 + 2 + 8;
    bytes[f2] = 0x25;
    let out = switchyard(
        &[
            "decode",
            "--dialect",
            "cup-pos",
            "--hex",
            &hex::encode(&bytes),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        err,
        format!("error: field 2 at byte {f2}: length 25 exceeds the maximum 19\n")
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn encode_refuses_bad_json_with_status_2() {
    let cases = [
        (
            "iso87",
            r#"{"mti": "0200", "fields": {"3": "12"}}"#,
            "field 3: length 2 does not fit n6",
        ),
        (
            "iso87",
            r#"{"mti": "0200", "fields": {"99": "1"}}"#,
            "field 99 is not defined",
        ),
        (
            "iso87",
            r#"{"mti": "0200", "fields": {"2": "62220x"}}"#,
            "field 2: character 'x'",
        ),
        (
            "iso87",
            r#"{"mti": "0200", "fields": {"52": "ABC"}}"#,
            r#"field 52: "ABC" is not hex"#,
        ),
        (
            "cup-pos",
            r#"{"mti": "0200", "fields": {}}"#,
            "tpdu is required in the cup-pos dialect",
        ),
        (
            "cup-pos",
            r#"{"tpdu": "6000030000", "header": "603100000000", "mti": "0200", "fields": {"70": "301"}}"#,
            "field 70 is not defined",
        ),
        ("iso87", r#"{"mti": "200"}"#, "not four digits"),
        (
            "iso87",
            r#"{"mti": "0200", "fields": {}, "extra": 1}"#,
            r#"unknown key "extra""#,
        ),
        ("iso87", "not json", "stdin is not JSON"),
    ];
    for (dialect, json, message) in cases {
        let out = switchyard(&["encode", "--dialect", dialect], Some(json));
        assert_eq!(out.status.code(), Some(2), "{json}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(message), "{json}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn a_dialect_file_overrides_the_embedded_one_and_bad_ones_are_named() {
    let dir = std::env::temp_dir().join(format!("sy-dialect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/dialects/iso87.toml");
    let text = std::fs::read_to_string(shipped).unwrap();
    // An acquirer whose network counts F43 as 25 characters edits the file.
    let custom = dir.join("custom.toml");
    std::fs::write(
        &custom,
        text.replace(r#"format = "ans40""#, r#"format = "ans25""#),
    )
    .unwrap();
    let json = r#"{"mti": "0200", "fields": {"43": "SWITCHYARD DEMO STORE    "}}"#;
    let out = switchyard(
        &[
            "encode",
            "--dialect",
            "iso87",
            "--dialect-file",
            custom.to_str().unwrap(),
        ],
        Some(json),
    );
    assert!(
        stdout(&out)
            .trim()
            .ends_with(&hex::encode_upper("SWITCHYARD DEMO STORE    "))
    );
    let broken = dir.join("broken.toml");
    std::fs::write(
        &broken,
        text.replace(r#"format = "n6""#, r#"format = "n6x""#),
    )
    .unwrap();
    let out = switchyard(
        &[
            "encode",
            "--dialect",
            "iso87",
            "--dialect-file",
            broken.to_str().unwrap(),
        ],
        Some(json),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    let line = text
        .lines()
        .position(|l| l.contains(r#"format = "n6""#))
        .unwrap()
        + 1;
    assert!(
        err.contains(&format!(
            "broken.toml:{line}: fields.3.format: \"n6x\" is not a format"
        )),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every `.toml` under `config/` (recursively).
fn shipped_configs() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "toml") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config"),
        &mut out,
    );
    out.sort();
    out
}

#[test]
fn config_check_passes_every_shipped_config() {
    let configs = shipped_configs();
    assert!(configs.len() >= 5, "{configs:?}");
    for path in configs {
        let out = switchyard(&["config", "check", path.to_str().unwrap()], None);
        assert!(
            out.status.success(),
            "{}: {}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn config_check_tells_the_kind_from_the_keys_not_the_path() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
    // Copied under names and folders that say something else.
    let dir = std::env::temp_dir().join(format!("sy-kind-{}", std::process::id()));
    let load = dir.join("downloads/load");
    std::fs::create_dir_all(&load).unwrap();
    for (shipped, copy, kind) in [
        ("switchyard.toml", "issuer-old.toml", "a switch config"),
        ("issuer-sim.toml", "terminals.toml", "an issuer config"),
        ("terminals.toml", "switchyard.toml", "a terminals file"),
        ("dialects/iso87.toml", "network.toml", "a dialect table"),
        ("load/smoke.toml", "smoke.toml", "a load scenario"),
    ] {
        let text = std::fs::read_to_string(root.join(shipped)).unwrap();
        // The switch config's terminals file is read from the copy's folder:
        // point it back at the shipped one.
        let text = text.replace(
            "= \"terminals.toml\"",
            &format!("= \"{}/terminals.toml\"", root.display()),
        );
        let path = load.join(copy);
        std::fs::write(&path, text).unwrap();
        let out = switchyard(&["config", "check", path.to_str().unwrap()], None);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{shipped} as {copy}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("ok (read as {kind}; --kind to say otherwise)")),
            "{shipped} as {copy}: {stdout}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_check_refuses_a_dialect_without_a_field_the_switch_writes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
    let dir = std::env::temp_dir().join(format!("sy-fit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let iso87 = std::fs::read_to_string(root.join("dialects/iso87.toml")).unwrap();
    let without_70: String = iso87
        .lines()
        .filter(|l| !l.starts_with("70 "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(dir.join("network.toml"), &without_70).unwrap();
    let config = dir.join("switch.toml");
    std::fs::write(
        &config,
        "[dialects]\nnetwork = \"network.toml\"\n[[issuers]]\nname = \"sim\"\nbins = [\"622202\"]\n",
    )
    .unwrap();
    let out = switchyard(&["config", "check", config.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let fields = without_70.lines().position(|l| l == "[fields]").unwrap() + 1;
    let expected = format!(
        "{}:{fields}: fields.70: the switch reads and writes the network management code here on the network side (a number): ",
        dir.join("network.toml").display()
    );
    assert!(stdout.contains(&expected), "{expected}\nnot in\n{stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_key_file_that_cannot_be_read_is_named_with_the_config_line() {
    let dir = std::env::temp_dir().join(format!("sy-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let issuer = dir.join("issuer.toml");
    std::fs::write(
        &issuer,
        "listen = \"127.0.0.1:0\"\n[keys]\npan_key_file = \"nokey.key\"\n[[cards]]\nfirst = \"6222020000000000001\"\nlast = \"6222020000000000002\"\n",
    )
    .unwrap();
    let out = switchyard(&["config", "check", issuer.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Read from beside the config, not from where the command runs.
    let expected = format!(
        "{}:3: keys.pan_key_file: {}",
        issuer.display(),
        dir.join("nokey.key").display()
    );
    assert!(
        stdout.starts_with(&expected),
        "{expected}\nnot in\n{stdout}"
    );
    // A key beside it, in the right shape, passes.
    std::fs::write(dir.join("nokey.key"), format!("{}\n", "ab".repeat(32))).unwrap();
    let out = switchyard(&["config", "check", issuer.to_str().unwrap()], None);
    assert!(out.status.success(), "{out:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_shipped_terminals_file_seeds_every_terminal_the_shipped_scenarios_use() {
    // `switchyard load config/load/mixed.toml` against `serve` (and compose's
    // load profile) signs on T0000001 upwards, as many as the scenario says.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let fleet = switch::terminals::Fleet::parse(
        &std::fs::read_to_string(root.join("config/terminals.toml")).unwrap(),
        "terminals.toml",
    )
    .unwrap();
    let seeded: std::collections::HashMap<&str, &str> = fleet
        .terminals
        .iter()
        .map(|t| (t.id.as_str(), t.merchant_id.as_str()))
        .collect();
    for entry in std::fs::read_dir(root.join("config/load")).unwrap() {
        let path = entry.unwrap().path();
        let scenario = loadgen::scenario::Scenario::load(&path).unwrap();
        for n in 1..=scenario.terminals {
            let id = format!("T{n:07}");
            assert_eq!(
                seeded.get(id.as_str()).copied(),
                Some(scenario.merchant.as_str()),
                "{} plays {id} of its merchant: config/terminals.toml must seed it so",
                path.display()
            );
        }
    }
}

#[test]
fn every_config_docker_compose_names_is_shipped() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let compose = std::fs::read_to_string(root.join("docker-compose.yml")).unwrap();
    // The services mount ./config at /config.
    let named: Vec<&str> = compose
        .split('"')
        .filter(|s| s.starts_with("/config/"))
        .collect();
    assert!(named.len() >= 3, "{named:?}");
    for path in named {
        let shipped = root.join(path.trim_start_matches('/'));
        assert!(
            shipped.is_file(),
            "docker-compose.yml names {path}: not in the repo"
        );
    }
}

#[test]
fn config_check_lists_every_problem_with_file_line_and_key() {
    let dir = std::env::temp_dir().join(format!("sy-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("switchyard.toml");
    std::fs::write(
        &bad,
        "listen = \"127.0.0.1:8583\"\nlisten_backlog = 5\n[rules]\nissuer_timeout = \"ten seconds\"\nduplicates = \"ignore\"\n[[issuers]]\nbins = []\n",
    )
    .unwrap();
    let out = switchyard(&["config", "check", bad.to_str().unwrap()], None);
    assert_ne!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    let file = bad.display().to_string();
    for expected in [
        format!("{file}:2: listen_backlog: unknown key"),
        format!("{file}:4: rules.issuer_timeout: \"ten seconds\" is not a duration"),
        format!("{file}:5: rules.duplicates: \"ignore\" is not one of \"replay\", \"reject\""),
        format!("{file}:7: issuers[0].bins: name at least one PAN prefix"),
    ] {
        assert!(
            text.contains(&expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_check_names_a_terminal_or_merchant_given_twice() {
    // Found at serve only, before, by PostgreSQL refusing the seed.
    let dir = scratch("check-twice");
    let fleet = dir.join("terminals.toml");
    std::fs::write(
        &fleet,
        "[[merchants]]\nid = \"898310048160001\"\n[[merchants]]\nid = \"898310048160001\"\n\
         [[terminals]]\nfirst = \"T0000001\"\nlast = \"T0000100\"\nmerchant = \"898310048160001\"\n\
         [[terminals]]\nid = \"T0000007\"\nmerchant = \"898310048160001\"\n",
    )
    .unwrap();
    let out = switchyard(&["config", "check", fleet.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8(out.stdout).unwrap();
    let file = fleet.display().to_string();
    for expected in [
        format!("{file}:4: merchants[1].id: \"898310048160001\" is also merchants[0] (line 1)"),
        format!("{file}:10: terminals[1].id: \"T0000007\" is also in terminals[0] (line 5)"),
    ] {
        assert!(
            text.contains(&expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn demo_serve_answers_terminals_and_exits_0_on_sigterm() {
    use std::io::BufRead;
    // Port 0: the demo says which port it got. (A port found free here and
    // handed over could be taken meanwhile by a server another test starts.)
    let errors = std::env::temp_dir().join(format!("sy-serve-{}.err", std::process::id()));
    let mut child = Running(
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["demo", "--serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&errors).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let Some(Ok(first)) = lines.next() else {
        let log = std::fs::read_to_string(&errors).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        panic!("the demo ended before serving:\n{}", tail.join("\n"));
    };
    let listen = first
        .strip_prefix("switchyard demo: terminals connect to 127.0.0.1:")
        .and_then(|rest| rest.strip_suffix(" (cup-pos)"))
        .and_then(|port| port.parse::<u16>().ok())
        .map(|port| format!("127.0.0.1:{port}"))
        .unwrap_or_else(|| panic!("not the first line of demo --serve: {first}"));
    // A real terminal exchange through the running demo.
    let load = switchyard(
        &[
            "load",
            "--target",
            &listen,
            "--terminals",
            "2",
            "--duration",
            "1s",
        ],
        None,
    );
    let report = stdout(&load);
    assert!(report.contains("failed 0"), "{report}");
    // The operator looks a transaction up in the demo's journal.
    let second = lines.next().expect("a second line").unwrap();
    let url = second
        .split("PostgreSQL at ")
        .nth(1)
        .expect("the database URL")
        .trim()
        .to_string();
    let show = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(args)
            .env("DATABASE_URL", &url)
            .output()
            .unwrap()
    };
    let text = stdout(&show(&["txn", "show", "--rrn", "000000000001"]));
    assert!(
        text.contains("purchase") && text.contains("approved"),
        "{text}"
    );
    assert!(text.contains("622202*********"), "masked PAN: {text}");
    assert!(text.contains("rrn 000000000001"), "{text}");
    let first: serde_json::Value = serde_json::from_str(&stdout(&show(&[
        "txn",
        "show",
        "--rrn",
        "000000000001",
        "--json",
    ])))
    .unwrap();
    let (terminal, batch, stan) = (
        first["history"][0]["terminal"]
            .as_str()
            .unwrap()
            .to_string(),
        first["history"][0]["batch"].to_string(),
        first["history"][0]["stan"].to_string(),
    );
    let json: serde_json::Value = serde_json::from_str(&stdout(&show(&[
        "txn",
        "show",
        "--terminal",
        &terminal,
        "--batch",
        &batch,
        "--stan",
        &stan,
        "--json",
    ])))
    .unwrap();
    assert_eq!(json, first, "the same transaction either way");
    assert_eq!(json["history"][0]["kind"], "purchase");
    assert!(
        json["history"][0]["terminal"]
            .as_str()
            .unwrap()
            .starts_with("T00000")
    );
    let missing = show(&["txn", "show", "--rrn", "999999999999"]);
    assert_eq!(missing.status.code(), Some(2));
    let report = stdout(&show(&[
        "settlement",
        "report",
        "--terminal",
        "T0000001",
        "--batch",
        "1",
    ]));
    assert!(
        report.contains("settlement: none yet")
            && report.contains("batch upload: none yet; the journal counted "),
        "{report}"
    );
    // A scenario file against the running switch, with the report as JSON
    // and as a page.
    let dir = std::env::temp_dir().join(format!("sy-scenario-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let scenario = dir.join("short.toml");
    std::fs::write(&scenario, "terminals = 3\nrate = 30\nduration = \"1s\"\nsettle = false\n[mix]\npurchase = 3\nvoid = 1\n").unwrap();
    let json_file = dir.join("report.json");
    let html_file = dir.join("report.html");
    // A part named by a process that is not there is refused up front.
    let refused = switchyard(
        &[
            "load",
            scenario.to_str().unwrap(),
            "--target",
            &listen,
            "--cpu",
            "switch=4294967295",
        ],
        None,
    );
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no process 4294967295 on this machine"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let server = child.id().to_string();
    let played = switchyard(
        &[
            "load",
            scenario.to_str().unwrap(),
            "--target",
            &listen,
            "--json",
            json_file.to_str().unwrap(),
            "--html",
            html_file.to_str().unwrap(),
            "--cpu",
            &format!("demo={server}"),
        ],
        None,
    );
    stdout(&played);
    // Not a terminal: no progress line.
    assert!(
        !String::from_utf8_lossy(&played.stderr).contains('\r'),
        "a progress line went to a pipe"
    );
    let page = std::fs::read_to_string(&html_file).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
    assert_eq!(page.matches("<svg ").count(), 2, "{page}");
    assert!(page.contains("<td>purchase 3, void 1</td>"), "{page}");
    assert!(
        page.contains("<tr><td>all</td><td class=\"n\">30</td>"),
        "{page}"
    );
    assert!(
        !page.contains("http") && !page.contains("<script"),
        "{page}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_file).unwrap()).unwrap();
    assert_eq!(json["scheduled"], 30);
    assert_eq!(json["report"]["kinds"]["all"]["count"], 30);
    assert!(
        json["report"]["kinds"]["purchase"]["p99_ms"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    // Against a switch in another process, the load generator names its own
    // CPU time and the processes it was given (here the demo, with its
    // private PostgreSQL under it); the rest of the machine's is "elsewhere".
    let cpu = &json["cpu"]["per_transaction_us"];
    assert!(cpu["load generator"].as_f64().is_some(), "{json}");
    assert!(cpu["demo"].as_f64().is_some(), "{json}");
    // One step, at the scenario's rate, with its own CPU figures.
    assert_eq!(json["steps"].as_array().map(Vec::len), Some(1), "{json}");
    assert_eq!(json["steps"][0]["rate"], 30, "{json}");
    assert!(
        json["steps"][0]["cpu"]["cores_busy"].as_f64().is_some(),
        "{json}"
    );
    assert_eq!(cpu.as_object().map(|o| o.len()), Some(2), "{json}");
    assert!(page.contains("<h2>CPU per transaction</h2>"), "{page}");
    std::fs::remove_dir_all(&dir).unwrap();
    let exit = child.terminate();
    assert_eq!(exit.code(), Some(0), "graceful shutdown exits 0");
    let _ = std::fs::remove_file(&errors);
}

#[tokio::test]
async fn a_database_error_is_said_by_its_message_and_sqlstate() {
    let url = embedded_pg::test_database().await;
    // The same server, a database that is not there.
    let (server, _) = url.rsplit_once('/').unwrap();
    let missing = format!("{server}/no_such_db");
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["migrate"])
        .env("DATABASE_URL", &missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/no_such_db: database \"no_such_db\" does not exist (SQLSTATE 3D000)"),
        "{err}"
    );
    assert!(
        !err.contains(" at line "),
        "PostgreSQL's source line: {err}"
    );
}

#[tokio::test]
async fn terminals_import_loads_a_csv_fleet_and_names_bad_rows() {
    let url = embedded_pg::test_database().await;
    let dir = std::env::temp_dir().join(format!("sy-import-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("fleet.csv");
    let mut csv = String::from("terminal_id,merchant_id,merchant_name,mcc,enabled\n");
    for i in 1..=250 {
        csv.push_str(&format!("P{i:07},898310048169999,Fleet Store,5812,true\n"));
    }
    std::fs::write(&good, csv).unwrap();
    let run = |file: &Path| {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["terminals", "import", file.to_str().unwrap()])
            .env("DATABASE_URL", &url)
            .output()
            .unwrap()
    };
    let out = stdout(&run(&good));
    assert!(
        out.contains("imported 250 terminals of 1 merchants"),
        "{out}"
    );
    let pool = switch::connect(&url, 1).await.unwrap();
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM terminals WHERE merchant_id = '898310048169999'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(count, 250);
    let bad = dir.join("bad.csv");
    std::fs::write(
        &bad,
        "terminal_id,merchant_id\nP0000001,898310048169999\nSHORT,898310048169999\n",
    )
    .unwrap();
    let out = run(&bad);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("bad.csv:3: terminal_id: \"SHORT\" is not 8 characters"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `switchyard terminals import FILE` on the database at `url`.
fn import(url: &str, file: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["terminals", "import", file.to_str().unwrap()])
        .env("DATABASE_URL", url)
        .output()
        .unwrap()
}

/// A directory of its own for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sy-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn terminals_import_writes_only_the_columns_the_csv_has() {
    let url = embedded_pg::test_database().await;
    let dir = scratch("import-columns");
    let full = dir.join("full.csv");
    std::fs::write(
        &full,
        "terminal_id,merchant_id,merchant_name,mcc,enabled\n\
         P0000001,898310048169999,Fleet Store,5812,true\n\
         P0000002,898310048169999,Fleet Store,5812,false\n",
    )
    .unwrap();
    stdout(&import(&url, &full));
    // The documented two columns, for a terminal more: the merchant keeps
    // its name and category (F18 goes to the issuer), the disabled terminal
    // stays disabled, the new one may transact.
    let ids = dir.join("ids.csv");
    std::fs::write(
        &ids,
        "terminal_id,merchant_id\nP0000001,898310048169999\nP0000002,898310048169999\nP0000003,898310048169999\n",
    )
    .unwrap();
    stdout(&import(&url, &ids));
    let pool = switch::connect(&url, 1).await.unwrap();
    let merchant: (String, String, bool) =
        sqlx::query_as("SELECT name, mcc, enabled FROM merchants WHERE id = '898310048169999'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(merchant, ("Fleet Store".into(), "5812".into(), true));
    let enabled: Vec<(String, bool)> =
        sqlx::query_as("SELECT id, enabled FROM terminals ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        enabled,
        [
            ("P0000001".into(), true),
            ("P0000002".into(), false),
            ("P0000003".into(), true)
        ]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn terminals_import_refuses_a_terminal_listed_twice_before_writing() {
    let url = embedded_pg::test_database().await;
    let dir = scratch("import-twice");
    let first = dir.join("first.csv");
    std::fs::write(
        &first,
        "terminal_id,merchant_id,merchant_name,mcc\nP0000001,898310048169999,Fleet Store,5812\n",
    )
    .unwrap();
    stdout(&import(&url, &first));
    let twice = dir.join("twice.csv");
    std::fs::write(
        &twice,
        "terminal_id,merchant_id,merchant_name,mcc\n\
         P0000001,898310048169999,Fleet Store,5411\n\
         P0000002,898310048169999,Fleet Store,5411\n\
         P0000001,898310048169999,Fleet Store,5411\n",
    )
    .unwrap();
    let out = import(&url, &twice);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("twice.csv:4: terminal_id: \"P0000001\" is also on line 2"),
        "{err}"
    );
    let pool = switch::connect(&url, 1).await.unwrap();
    let mcc: String = sqlx::query_scalar("SELECT mcc FROM merchants WHERE id = '898310048169999'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(mcc, "5812", "nothing of a refused file is written");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn terminals_import_adds_a_merchant_only_when_the_csv_names_it() {
    let url = embedded_pg::test_database().await;
    let dir = scratch("import-merchant");
    let known = dir.join("known.csv");
    std::fs::write(
        &known,
        "terminal_id,merchant_id,merchant_name,mcc\nP0000001,898310048169999,Fleet Store,5812\n",
    )
    .unwrap();
    stdout(&import(&url, &known));
    // A merchant id with a typo, on the second row: refused, and the first
    // row, good as it is, is not written either.
    let typo = dir.join("typo.csv");
    std::fs::write(
        &typo,
        "terminal_id,merchant_id,merchant_name\n\
         P0000002,898310048169999,\n\
         P0000003,898310048196999,\n",
    )
    .unwrap();
    let out = import(&url, &typo);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains(
            "typo.csv:3: merchant_id: \"898310048196999\" is not a merchant the switch knows"
        ),
        "{err}"
    );
    let pool = switch::connect(&url, 1).await.unwrap();
    let terminals: i64 = sqlx::query_scalar("SELECT count(*) FROM terminals")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(terminals, 1);
    // Named, a new merchant is what the file asks for.
    let named = dir.join("named.csv");
    std::fs::write(
        &named,
        "terminal_id,merchant_id,merchant_name\nP0000003,898310048160077,Night Market\n",
    )
    .unwrap();
    stdout(&import(&url, &named));
    let merchant: (String, String) =
        sqlx::query_as("SELECT name, mcc FROM merchants WHERE id = '898310048160077'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(merchant, ("Night Market".into(), "5999".into()));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_demo_plays_the_smoke_scenario_and_the_money_balances() {
    // The README's first command.
    let out = switchyard(&["demo"], None);
    let text = stdout(&out);
    assert!(
        text.contains("scenario smoke: 200 requests scheduled"),
        "{text}"
    );
    assert!(text.contains("settlements balanced 10/10"), "{text}");
    assert!(text.contains("0 break(s)"), "{text}");
    // How the writes were grouped: both stages wrote batches, none empty.
    let grouped = text
        .lines()
        .find(|l| l.starts_with("group commit: "))
        .unwrap_or_else(|| panic!("no group commit line in:\n{text}"));
    let (journal, issuer) = grouped.split_once("; issuer ").unwrap();
    for stage in [journal.trim_start_matches("group commit: journal "), issuer] {
        // "N batches of M writes, ..."
        let words: Vec<&str> = stage.split_whitespace().collect();
        let batches: u64 = words[0].parse().unwrap_or(0);
        let per: f64 = words[3].parse().unwrap_or(0.0);
        assert_eq!(words[1..3], ["batches", "of"], "{grouped}");
        assert!(batches > 0 && per >= 1.0, "{grouped}");
    }
    assert!(
        text.trim_end()
            .ends_with("money check: balanced to the fen"),
        "{text}"
    );
    for kind in [
        "purchase",
        "void",
        "refund",
        "reversal",
        "duplicate",
        "preauth",
        "preauth_cancel",
        "completion",
        "settlement",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(kind)),
            "no {kind} line in:\n{text}"
        );
    }
}

/// The number right after `prefix` on the line that has it.
fn count_after(text: &str, prefix: &str) -> u64 {
    let line = text
        .lines()
        .find_map(|l| l.split_once(prefix).map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{text}"));
    let digits: String = line.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {prefix:?} in:\n{text}"))
}

#[test]
fn a_fault_scenario_still_ends_with_a_passing_money_check() {
    // Everything in faults.toml breaks once: issuer replies, terminal
    // connections, the issuer (restarted), the switch (SIGKILL, restarted).
    let faults = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/load/faults.toml");
    let json_file = std::env::temp_dir().join(format!("sy-faults-{}.json", std::process::id()));
    let out = switchyard(
        &[
            "demo",
            "--scenario",
            faults.to_str().unwrap(),
            "--json",
            json_file.to_str().unwrap(),
        ],
        None,
    );
    let text = stdout(&out);
    assert!(text.contains("scenario faults:"), "{text}");
    let all = text.lines().find(|l| l.starts_with("all")).unwrap();
    // The report as JSON too, the same figures as the table.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_file).unwrap()).unwrap();
    std::fs::remove_file(&json_file).unwrap();
    assert_eq!(
        json["report"]["kinds"]["all"]["count"].as_u64(),
        all.split_whitespace().nth(1).and_then(|n| n.parse().ok()),
        "{json}"
    );
    // Where the CPU went, part by part: the database and the switch (a
    // child process here, killed and started again) both worked.
    assert!(text.contains("CPU per transaction: PostgreSQL "), "{text}");
    let cpu = &json["cpu"];
    let part = |name: &str| cpu["per_transaction_us"][name].as_f64().unwrap_or(-1.0);
    assert!(part("PostgreSQL") > 0.0, "{json}");
    assert!(part("switch") > 0.0, "{json}");
    assert!(
        part("issuer") >= 0.0 && part("load generator") >= 0.0,
        "{json}"
    );
    let parts = ["PostgreSQL", "switch", "issuer", "load generator"].map(part);
    let total = cpu["total_us"].as_f64().unwrap();
    assert!(
        (parts.iter().sum::<f64>() + cpu["elsewhere_us"].as_f64().unwrap() - total).abs() < 1.0,
        "{json}"
    );
    // The issuer broke: some terminals heard 98 (no answer in time) or 91 (link down).
    assert!(
        all.contains("98:") || all.contains("91:"),
        "no fault showed: {all}"
    );
    // Terminals dropped their lines mid-request and came back.
    assert!(count_after(&text, "terminals: ") > 0, "{text}");
    assert!(text.contains("connection resets injected"), "{text}");
    // The issuer went away and the switch's link signed on again by itself.
    assert!(text.contains("fault: issuer stopped at"), "{text}");
    assert!(text.contains("fault: issuer listening again on"), "{text}");
    assert!(
        count_after(&text, "faults: issuer restarted; ") > 0,
        "{text}"
    );
    // The switch was killed with a transaction at the issuer; the restarted
    // one reversed what the dead one left behind.
    assert!(text.contains("fault: switch killed (SIGKILL) at"), "{text}");
    assert!(
        count_after(&text, "faults: switch killed and restarted; ") > 0,
        "{text}"
    );
    // Every terminal still settled balanced, and the money agrees.
    let settled = text
        .lines()
        .find_map(|l| l.split_once("settlements balanced "))
        .map(|(_, n)| n.trim().to_string())
        .unwrap();
    assert_eq!(settled, "8/8", "{text}");
    assert!(text.contains("0 break(s)"), "{text}");
    assert!(
        text.trim_end()
            .ends_with("money check: balanced to the fen"),
        "{text}"
    );
}

#[test]
fn commands_that_keep_state_refuse_a_database_thrown_away_on_exit() {
    let dir = std::env::temp_dir().join(format!("sy-nodb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // No database.url, no database.embedded_data_dir, no DATABASE_URL.
    let switch = dir.join("switchyard.toml");
    std::fs::write(&switch, "institution_id = \"48560000\"\n").unwrap();
    let issuer = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/issuer-sim.toml");
    let (switch, issuer) = (switch.to_str().unwrap(), issuer.to_str().unwrap());
    for args in [
        vec!["migrate", "--config", switch],
        vec!["txn", "show", "--rrn", "000000000001", "--config", switch],
        vec!["issuer", "--config", issuer],
        vec![
            "issuer",
            "--config",
            issuer,
            "clearing",
            "--date",
            "2026-12-07",
        ],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(&args)
            .env_remove("DATABASE_URL")
            .env("SWITCHYARD_ISSUER_PAN_KEY", "11".repeat(32))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("no database: set database.url in the config, DATABASE_URL, or database.embedded_data_dir"),
            "{args:?}: {err}"
        );
        assert!(
            !err.contains("private PostgreSQL started"),
            "{args:?}: {err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_data_dir_relative_to_a_relative_config_keeps_the_journal() {
    let dir = std::env::temp_dir().join(format!("sy-datadir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("conf")).unwrap();
    std::fs::write(
        dir.join("conf/switchyard.toml"),
        "[database]\nembedded_data_dir = \"pgdata\"\n",
    )
    .unwrap();
    let migrate = || {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["migrate", "--config", "conf/switchyard.toml"])
            .current_dir(&dir)
            .env_remove("DATABASE_URL")
            .output()
            .unwrap()
    };
    let first = stdout(&migrate());
    assert!(first.starts_with("applied "), "{first}");
    assert!(
        dir.join("conf/pgdata/PG_VERSION").is_file(),
        "kept beside the config"
    );
    // A second command finds the same journal, migrated already.
    let second = stdout(&migrate());
    assert!(second.contains("nothing to apply"), "{second}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn reconcile_says_why_it_found_nothing_and_refuses_another_days_file() {
    let url = embedded_pg::test_database().await;
    let dir = std::env::temp_dir().join(format!("sy-reconcile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(args)
            .env("DATABASE_URL", &url)
            .output()
            .unwrap()
    };
    stdout(&run(&["migrate"]));
    let header = "posting_id,time,acquirer,stan,transmitted,mti,processing_code,kind,pan,amount,effect,auth_code,response_code,rrn,terminal,merchant,original,reversed,state,balance_change,hold_change,note\n";
    let empty = dir.join("empty.csv");
    std::fs::write(&empty, header).unwrap();
    // A day without traffic: nothing to check, said as such, and no failure.
    let out = stdout(&run(&[
        "reconcile",
        "--clearing-file",
        empty.to_str().unwrap(),
    ]));
    assert!(out.starts_with("nothing to check"), "{out}");
    // An entry of business day 12-08 received on UTC day 12-07 (past the
    // 23:00 cut-over in Shanghai): a check of "12-08" finds nothing, and
    // says why rather than calling it balanced.
    let pool = switch::connect(&url, 1).await.unwrap();
    sqlx::query(
        "INSERT INTO journal (rrn, terminal_id, merchant_id, batch, stan, mti, mti_class,
             processing_code, kind, amount, request_digest, state, issuer, business_date, received_at)
         VALUES ('000000000001', 'T0000001', '898310048160001', 1, 1, 200, 2, '000000', 'purchase',
             7858, '\\x00', 'approved', 'sim', '2026-12-08', '2026-12-07T17:23:45Z')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let out = run(&[
        "reconcile",
        "--clearing-file",
        empty.to_str().unwrap(),
        "--date",
        "2026-12-08",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no journal entry was received on 2026-12-08 (a UTC day), but 1 have 2026-12-08 for their business day"),
        "{err}"
    );
    // All days against a file of none: a break, and the file named.
    let out = run(&["reconcile", "--clearing-file", empty.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("empty.csv holds no posting"), "{err}");
    let day = dir.join("day.csv");
    std::fs::write(
        &day,
        format!("{header}1,2026-12-07T17:23:45.551Z,00048560000,000001,1207172345,0200,000000,purchase,622202*********0092,7858,debit,007932,00,000000000001,T0000001,898310048160001,,false,approved,-7858,0,\n"),
    )
    .unwrap();
    let out = run(&[
        "reconcile",
        "--clearing-file",
        day.to_str().unwrap(),
        "--date",
        "2026-12-08",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("holds postings of 2026-12-07 (UTC days), none of --date 2026-12-08"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn load_against_a_dead_target_names_the_cause_once_with_its_terminals() {
    // A port nothing listens on any more.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap().to_string();
    drop(listener);
    let out = switchyard(
        &[
            "load",
            "--target",
            &target,
            "--terminals",
            "2",
            "--duration",
            "1s",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains(&format!(
            "error: 2 of 2 terminals stopped early:\n  T0000001, T0000002: cannot connect to {target}: connection refused\n"
        )),
        "{err}"
    );
    let report = String::from_utf8(out.stdout).unwrap();
    assert!(report.contains("requests        0"), "{report}");
}

#[test]
fn load_refuses_closed_loop_flags_with_a_scenario_file() {
    let smoke = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/load/smoke.toml");
    let out = switchyard(
        &[
            "load",
            smoke.to_str().unwrap(),
            "--terminals",
            "3",
            "--duration",
            "1s",
            "--mix",
            "void-heavy",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.starts_with("error: --terminals, --duration, --mix belong to the closed loop"),
        "{err}"
    );
    assert!(err.contains("smoke.toml sets its terminals"), "{err}");
    assert!(out.stdout.is_empty());
}

/// A pipe whose reader is gone, as `| head -1` leaves it once head exits.
fn closed_pipe() -> Stdio {
    let mut reader = Command::new("true").stdin(Stdio::piped()).spawn().unwrap();
    let writer = reader.stdin.take().unwrap();
    reader.wait().unwrap();
    Stdio::from(writer)
}

#[test]
fn a_closed_stdout_ends_a_command_quietly_with_the_status_of_a_broken_pipe() {
    let hex = std::fs::read_to_string(fixture_dir("cup-pos").join("purchase.request.hex")).unwrap();
    // decode writes its JSON itself; encode prints it (`println!`).
    let decode = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["decode", "--dialect", "cup-pos", "--hex", hex.trim()])
        .stdout(closed_pipe())
        .output()
        .unwrap();
    let json = stdout(&switchyard(
        &[
            "decode",
            "--dialect",
            "cup-pos",
            "--reveal",
            "--hex",
            hex.trim(),
        ],
        None,
    ));
    let mut encode = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["encode", "--dialect", "cup-pos"])
        .stdin(Stdio::piped())
        .stdout(closed_pipe())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    encode
        .stdin
        .take()
        .unwrap()
        .write_all(json.as_bytes())
        .unwrap();
    let encode = encode.wait_with_output().unwrap();
    for (name, out) in [("decode", decode), ("encode", encode)] {
        assert_eq!(
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).as_ref()
            ),
            (Some(141), ""),
            "{name}"
        );
    }
}

#[tokio::test]
async fn the_clearing_file_needs_no_pan_key() {
    let url = embedded_pg::test_database().await;
    let issuer = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/issuer-sim.toml");
    // A day's, and (without --date) every day's.
    for days in [&["--date", "2026-12-07"][..], &[]] {
        let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["issuer", "--config", issuer.to_str().unwrap(), "clearing"])
            .args(days)
            .env("DATABASE_URL", &url)
            .env_remove("SWITCHYARD_ISSUER_PAN_KEY")
            .output()
            .unwrap();
        let text = stdout(&out);
        assert!(text.starts_with("posting_id,time,"), "{text}");
    }
}

#[test]
fn config_check_names_missing_files_at_their_keys_beside_other_problems() {
    let dir = std::env::temp_dir().join(format!("sy-named-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("sw.toml");
    std::fs::write(
        &config,
        "[keys]\npan_hash_key_file = \"missing.key\"\n[seed]\nterminals = \"terminalz.toml\"\n[dialects]\nterminal = \"cup.toml\"\n[limits]\nmax_frame = \"2k\"\n",
    )
    .unwrap();
    let out = switchyard(&["config", "check", config.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(2));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let at = |line: usize, key: &str| format!("{}:{line}: {key}: ", config.display());
    for expected in [
        at(8, "limits.max_frame"),
        at(4, "seed.terminals") + &dir.join("terminalz.toml").display().to_string(),
        at(6, "dialects.terminal") + &dir.join("cup.toml").display().to_string(),
        at(2, "keys.pan_hash_key_file"),
    ] {
        assert!(text.contains(&expected), "{expected:?} in {text}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_switch_whose_log_reader_is_gone_still_serves_and_stops_on_sigterm() {
    use std::io::BufRead;
    let mut child = Running(
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["demo", "--serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The log collector goes away at once: every log line meets a closed pipe.
    drop(child.stderr.take());
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("a first line").unwrap();
    let listen = first
        .strip_prefix("switchyard demo: terminals connect to ")
        .and_then(|rest| rest.strip_suffix(" (cup-pos)"))
        .unwrap_or_else(|| panic!("not the first line of demo --serve: {first}"))
        .to_string();
    let load = switchyard(
        &[
            "load",
            "--target",
            &listen,
            "--terminals",
            "2",
            "--duration",
            "1s",
        ],
        None,
    );
    let report = stdout(&load);
    assert!(report.contains("failed 0"), "{report}");
    let exit = child.terminate();
    assert_eq!(exit.code(), Some(0), "stopped by SIGTERM");
}

#[test]
fn a_report_file_that_cannot_be_written_is_refused_before_the_run() {
    let nowhere = std::env::temp_dir()
        .join(format!("sy-no-such-folder-{}", std::process::id()))
        .join("run.json");
    let out = switchyard(&["demo", "--json", nowhere.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--json ") && err.contains("run.json"), "{err}");
    assert!(
        !err.contains("private PostgreSQL started"),
        "refused before the run: {err}"
    );
}

#[test]
fn terminals_master_key_prints_each_terminals_key_as_the_switch_derives_it() {
    let dir = std::env::temp_dir().join(format!("sy-tmk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("sw.toml");
    std::fs::write(
        &config,
        "[keys]\nterminal_master_derivation_key_file = \"tmdk.key\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("tmdk.key"), "0123456789ABCDEFFEDCBA9876543210\n").unwrap();
    let out = switchyard(
        &[
            "terminals",
            "master-key",
            "T0000001",
            "T0000002",
            "--config",
            config.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let kdk = iso8583::keys::DerivationKey::new(&[
        0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF, 0xFE, 0xDC, 0xBA, 0x98, 0x76, 0x54, 0x32,
        0x10,
    ]);
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    // The derivation key's own check value first (that of the DES test key).
    assert_eq!(
        lines[0],
        "terminal master derivation key check value 08D7B4"
    );
    for (line, id) in lines[1..].iter().zip(["T0000001", "T0000002"]) {
        let tmk = kdk.master_key(id).clear();
        let check = iso8583::keys::check_value(&tmk);
        assert_eq!(
            *line,
            format!(
                "{id} {} check value {}",
                hex::encode_upper(tmk),
                hex::encode_upper(&check[..3])
            )
        );
    }
    // A key file that is no key is named at its key, by config check too.
    std::fs::write(dir.join("tmdk.key"), "not a key\n").unwrap();
    let out = switchyard(
        &[
            "terminals",
            "master-key",
            "T0000001",
            "--config",
            config.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    let expected = format!(
        "{}:2: keys.terminal_master_derivation_key_file: ",
        config.display()
    );
    assert!(stderr(&out).contains(&expected), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("32 hex characters"),
        "{}",
        stderr(&out)
    );
    let out = switchyard(&["config", "check", config.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &stderr(&out);
    assert!(text.contains(&expected), "{expected:?} in {text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn terminals_master_key_is_compared_with_the_journal_and_forget_keys_gives_k3_up() {
    let url = embedded_pg::test_database().await;
    let dir = scratch("tmk-journal");
    let import_file = dir.join("fleet.csv");
    std::fs::write(
        &import_file,
        "terminal_id,merchant_id,merchant_name\nK0000001,898310048169998,Key Store\n",
    )
    .unwrap();
    assert_eq!(import(&url, &import_file).status.code(), Some(0));
    let config = dir.join("sw.toml");
    std::fs::write(
        &config,
        "[keys]\nterminal_master_derivation_key_file = \"tmdk.key\"\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(args)
            .args(["--config", config.to_str().unwrap()])
            .env("DATABASE_URL", &url)
            .output()
            .unwrap()
    };
    let key_a = "0123456789ABCDEFFEDCBA9876543210";
    std::fs::write(dir.join("tmdk.key"), key_a).unwrap();
    // The journal has no derivation key yet: any is taken; a terminal it
    // does not know is refused.
    let out = run(&["terminals", "master-key", "K0000001"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run(&["terminals", "master-key", "K0000001", "Z0000009"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("not terminals of the journal: Z0000009"),
        "{}",
        stderr(&out)
    );
    // The journal's terminals got keys under A (as a switch records it).
    let pool = switch::connect(&url, 1).await.unwrap();
    sqlx::query("INSERT INTO meta (key_check, terminal_key_check) VALUES ('\\x00', '\\x08D7B4')")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE terminals SET working_keys = '\\x01' WHERE id = 'K0000001'")
        .execute(&pool)
        .await
        .unwrap();
    std::fs::write(dir.join("tmdk.key"), "FEDCBA98765432100123456789ABCDEF").unwrap();
    let out = run(&["terminals", "master-key", "K0000001"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("(check value 08D7B4): TMKs from it would not take their keys"),
        "{}",
        stderr(&out)
    );
    std::fs::write(dir.join("tmdk.key"), key_a).unwrap();
    assert_eq!(
        run(&["terminals", "master-key", "K0000001"]).status.code(),
        Some(0)
    );
    // Given up on purpose: keys and check value forgotten, any key taken.
    let out = run(&["terminals", "forget-keys"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("forgot the working keys of 1 terminal(s)"));
    let left: (Option<Vec<u8>>, i64) = sqlx::query_as(
        "SELECT (SELECT terminal_key_check FROM meta),
                (SELECT count(*) FROM terminals WHERE working_keys IS NOT NULL)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(left, (None, 0));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// One HTTP/1.1 GET, written by hand: status code and body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a whole response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

#[tokio::test]
async fn serve_answers_health_and_metrics_on_its_admin_listener() {
    use std::io::BufRead;
    let url = embedded_pg::test_database().await;
    let dir = scratch("admin");
    // An issuer nobody answers for: the switch serves, but cannot forward.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = gone.local_addr().unwrap().to_string();
    drop(gone);
    let config = dir.join("switchyard.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\n[database]\nplan_ahead = false\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [[issuers]]\nname = \"sim\"\nbins = [\"622202\"]\naddress = \"{nowhere}\"\nconnect_timeout = \"1s\"\n"
        ),
    )
    .unwrap();
    let mut child = Running(
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["serve", "--config", config.to_str().unwrap()])
            .env("DATABASE_URL", &url)
            .env("SWITCHYARD_PAN_HASH_KEY", "22".repeat(32))
            .env_remove("SWITCHYARD_TERMINAL_MASTER_DERIVATION_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("a first line").unwrap();
    let admin = first
        .strip_prefix("switchyard admin on http://")
        .and_then(|rest| rest.strip_suffix(" (/health, /metrics)"))
        .unwrap_or_else(|| panic!("not the admin line: {first}"))
        .to_string();
    // Serving once it listens for terminals, the issuer's cards answered 91.
    let second = lines.next().expect("a second line").unwrap();
    assert!(second.starts_with("switchyard listening on "), "{second}");
    let (status, body) = http_get(&admin, "/health");
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "degraded", "{body}");
    assert_eq!(health["database"], "ok", "{body}");
    assert_eq!(health["issuers"]["sim"], "down", "{body}");
    let (status, metrics) = http_get(&admin, "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("switchyard_issuer_link_up{issuer=\"sim\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_advices{state=\"pending\"} 0"),
        "{metrics}"
    );
    let exit = child.terminate();
    assert_eq!(exit.code(), Some(0), "stopped by SIGTERM");
    assert!(
        std::net::TcpStream::connect(&admin).is_err(),
        "the admin listener closed with the switch"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
