//! `bf init/commit/get/ls/rm/verify` end to end.

use std::path::PathBuf;

use crate::util::{data, files_under, mount_tmpfs, umount, Env};

const SEG: usize = 64 * 1024;

#[test]
fn edge_sizes_round_trip_and_survive_m_lost_locations() {
    let env = Env::new();
    env.init(4, 2);
    let sizes = [0, 1, SEG - 1, SEG, SEG + 1, 9 * SEG + 4321];
    for (i, len) in sizes.iter().enumerate() {
        env.write(&format!("in/f{i}"), &data(*len, i as u64));
    }
    env.ok(&["commit", "-r", "in"]);
    let ls: serde_json::Value = serde_json::from_str(&env.ok(&["ls", "--json"])).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), sizes.len());
    for (i, len) in sizes.iter().enumerate() {
        let row = ls.as_array().unwrap().iter().find(|r| r["name"] == format!("in/f{i}")).unwrap();
        assert_eq!(row["size"], *len as u64);
        assert_eq!(row["health"], "healthy");
    }
    let check_all = |tag: &str| {
        for (i, len) in sizes.iter().enumerate() {
            let out = env.path(&format!("out-{tag}-{i}"));
            env.ok(&["get", &format!("in/f{i}"), "-o", out.to_str().unwrap()]);
            assert_eq!(std::fs::read(&out).unwrap(), data(*len, i as u64), "file {i} ({tag})");
        }
    };
    check_all("healthy");
    // Lose m = 2 whole locations: everything still reads back identical; verify says degraded (exit 3).
    std::fs::remove_dir_all(env.location(0)).unwrap();
    std::fs::remove_dir_all(env.location(3)).unwrap();
    check_all("degraded");
    env.fails(&["verify"], 3);
    // Lose a third: segments are lost, with a clear one-line error naming the file and segment.
    std::fs::remove_dir_all(env.location(5)).unwrap();
    let err = env.fails(&["get", "in/f5", "-o", "lost"], 4);
    assert!(err.contains("in/f5") && err.contains("segment") && err.contains("lost"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!env.path("lost").exists(), "no partial output may be left behind");
    env.fails(&["verify"], 4);
}

#[test]
fn shards_never_contain_plaintext() {
    let env = Env::new();
    env.init(2, 1);
    let marker = b"PLAINTEXT-MARKER-7f3a9c";
    let body: Vec<u8> = marker.iter().copied().cycle().take(5 * SEG).collect();
    env.write("secret.txt", &body);
    env.ok(&["commit", "secret.txt"]);
    let files = files_under(&env.store().join("locations"));
    assert!(files.len() > 5);
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        assert!(!bytes.windows(marker.len()).any(|w| w == marker), "plaintext in {}", f.display());
        assert!(!bytes.windows(10).any(|w| w == b"secret.txt"), "file name in {}", f.display());
    }
}

#[test]
fn wrong_key_and_wrong_passphrase_are_refused() {
    let env = Env::new();
    env.init(2, 1);
    env.write("a", b"hello");
    env.ok(&["commit", "a"]);
    // A key from another store.
    let other = Env::new();
    other.init(2, 1);
    let err = env.fails(&["--key-file", other.store().join("master.key").to_str().unwrap(), "get", "a", "-o", "x"], 1);
    assert!(err.contains("wrong key"), "{err}");
    // Garbage instead of a key file.
    std::fs::write(env.path("junk.key"), b"not a key").unwrap();
    let err = env.fails(&["--key-file", env.path("junk.key").to_str().unwrap(), "ls"], 1);
    assert!(err.contains("key file"), "{err}");
    // Passphrase stores.
    let p = Env::new();
    let o = p
        .bf()
        .env("BF_PASSPHRASE", "correct horse")
        .args(["init", "--passphrase", "-k", "2", "-m", "1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!p.store().join("master.key").exists());
    p.write("b", b"bytes");
    assert!(p.bf().env("BF_PASSPHRASE", "correct horse").args(["commit", "b"]).status().unwrap().success());
    let o = p.bf().env("BF_PASSPHRASE", "wrong").args(["get", "b", "-o", "-"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("wrong key"));
    let o = p.bf().env("BF_PASSPHRASE", "correct horse").args(["get", "b", "-o", "-"]).output().unwrap();
    assert_eq!(o.stdout, b"bytes");
}

#[test]
fn damaged_headers_and_manifests_are_survived_or_reported() {
    let env = Env::new();
    env.init(4, 2);
    let bytes = data(6 * SEG, 77);
    env.write("f", &bytes);
    env.ok(&["commit", "f"]);
    // Truncate one shard into its header, garble another's header, on two different locations.
    let shards: Vec<_> = files_under(&env.location(1).join("shards"));
    std::fs::write(&shards[0], &std::fs::read(&shards[0]).unwrap()[..50]).unwrap();
    let shards: Vec<_> = files_under(&env.location(2).join("shards"));
    let mut b = std::fs::read(&shards[0]).unwrap();
    b[20] ^= 0xff;
    std::fs::write(&shards[0], b).unwrap();
    // Garble some copies of the catalog (not all).
    for i in [0, 4] {
        for m in files_under(&env.location(i).join("catalog")) {
            let mut b = std::fs::read(&m).unwrap();
            let mid = b.len() / 2;
            b[mid] ^= 1;
            std::fs::write(&m, b).unwrap();
        }
    }
    env.ok(&["get", "f", "-o", "back"]);
    assert_eq!(std::fs::read(env.path("back")).unwrap(), bytes);
    let v: serde_json::Value = {
        let o = env.run(&["verify", "--json"]);
        assert_eq!(o.status.code(), Some(3));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    assert_eq!(v[0]["shards_bad"], 2);
    // Every copy of the catalog garbled: a clear error, no panic, nothing listed as healthy.
    for i in 0..6 {
        for m in files_under(&env.location(i).join("catalog")) {
            std::fs::write(&m, b"BFCATRC\0garbage").unwrap();
        }
    }
    let err = env.fails(&["get", "f", "-o", "back2"], 1);
    assert!(err.contains("catalog"), "{err}");
    let err = env.fails(&["ls"], 1);
    assert!(err.contains("catalog") && err.contains("no valid copy"), "{err}");
}

#[test]
fn duplicate_names_missing_inputs_and_missing_store() {
    let env = Env::new();
    let err = env.fails(&["ls"], 1);
    assert!(err.contains("bf init"), "{err}");
    env.init(2, 1);
    env.write("a", b"one");
    env.ok(&["commit", "a"]);
    env.write("a", b"two");
    let err = env.fails(&["commit", "a"], 1);
    assert!(err.contains("already committed"), "{err}");
    env.ok(&["commit", "--replace", "a"]);
    assert_eq!(env.ok(&["get", "a", "-o", "-"]), "two");
    let err = env.fails(&["commit", "does-not-exist"], 1);
    assert!(err.contains("does-not-exist"), "{err}");
    let err = env.fails(&["get", "nope"], 1);
    assert!(err.contains("no file named"), "{err}");
    // rm removes the file and every shard.
    env.ok(&["rm", "a"]);
    env.fails(&["get", "a"], 1);
    for i in 0..3 {
        assert!(files_under(&env.location(i).join("shards")).is_empty());
        assert!(files_under(&env.location(i).join("manifests")).is_empty());
    }
    // Standard input with --name; get by root.
    let o = env
        .bf()
        .args(["commit", "-", "--name", "piped", "--json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(&data(3 * SEG + 5, 4))?;
            c.wait_with_output()
        });
    let o = o.unwrap();
    assert!(o.status.success());
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let root = report[0]["root"].as_str().unwrap().to_string();
    let o = env.run(&["get", &root, "-o", "-"]);
    assert_eq!(o.stdout, data(3 * SEG + 5, 4));
}

#[test]
fn verify_by_root_needs_no_key() {
    let env = Env::new();
    env.init(2, 1);
    env.write("a", &data(3 * SEG, 1));
    let root = env.ok(&["commit", "a"]).split_whitespace().next().unwrap().to_string();
    std::fs::rename(env.store().join("master.key"), env.path("key.offline")).unwrap();
    let out = env.ok(&["verify"]);
    assert!(out.contains(&root) && out.contains("ok"), "{out}");
    env.ok(&["verify", &root]);
}

#[test]
fn concurrent_commits_and_verify_leave_a_consistent_store() {
    let env = Env::new();
    env.init(3, 2);
    let a = data(20 * SEG, 1);
    let b = data(17 * SEG + 3, 2);
    env.write("a", &a);
    env.write("b", &b);
    env.ok(&["commit", "a"]);
    let c1 = env.bf().args(["commit", "b"]).spawn().unwrap();
    let c2 = env.bf().args(["commit", "--name", "a2", "a"]).spawn().unwrap();
    let c3 = env.bf().args(["verify"]).spawn().unwrap();
    let c4 = env.bf().args(["commit", "--replace", "a"]).spawn().unwrap();
    for mut c in [c1, c2, c3, c4] {
        assert!(c.wait().unwrap().success());
    }
    env.ok(&["verify"]);
    let ls: serde_json::Value = serde_json::from_str(&env.ok(&["ls", "--json"])).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 3);
    for (name, want) in [("a", &a), ("a2", &a), ("b", &b)] {
        let o = env.run(&["get", name, "-o", "-"]);
        assert_eq!(&o.stdout, want, "{name}");
    }
}

#[test]
fn disk_full_and_read_only_locations_commit_nothing() {
    let env = Env::new();
    let small = env.path("small-disk");
    if !mount_tmpfs(&small, "1m") {
        eprintln!("skipping: cannot mount tmpfs (needs root)");
        return;
    }
    let locs: Vec<String> = (0..3).map(|i| env.path(&format!("disk{i}")).display().to_string()).collect();
    for l in &locs {
        std::fs::create_dir_all(l).unwrap();
    }
    let small_s = small.display().to_string();
    let r = env.run(&[
        "init",
        "-k",
        "2",
        "-m",
        "1",
        "--segment-size-mb",
        "0.0625",
        "--location",
        &locs[0],
        "--location",
        &locs[1],
        "--location",
        &small_s,
    ]);
    assert!(r.status.success());
    env.write("big", &data(4 << 20, 3));
    let err = env.fails(&["commit", "big"], 1);
    assert!(err.contains("No space") || err.contains("space"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let nothing_committed = || {
        let ls = env.run(&["ls", "--json"]);
        assert_eq!(String::from_utf8_lossy(&ls.stdout).trim(), "[]");
        for l in &locs[..2] {
            assert!(files_under(&std::path::Path::new(l).join("shards")).is_empty(), "shards left on {l}");
        }
    };
    nothing_committed();
    // The same location made read-only: a one-line error naming the problem, nothing committed.
    let remount = std::process::Command::new("mount").args(["-o", "remount,ro"]).arg(&small).status().unwrap();
    assert!(remount.success());
    env.write("small", b"tiny");
    let err = env.fails(&["commit", "small"], 1);
    umount(&small);
    assert!(err.contains("Read-only"), "{err}");
    nothing_committed();
}

#[test]
fn both_io_engines_round_trip() {
    for engine in ["std", "uring"] {
        let env = Env::new();
        let o = env
            .bf()
            .env("BF_IO_ENGINE", engine)
            .args(["init", "-k", "2", "-m", "1", "--segment-size-mb", "0.0625"])
            .output()
            .unwrap();
        if !o.status.success() && engine == "uring" {
            eprintln!("SKIP: io_uring unavailable: {}", String::from_utf8_lossy(&o.stderr));
            continue;
        }
        let bytes = data(7 * SEG + 3, 11);
        env.write("f", &bytes);
        assert!(env.bf().env("BF_IO_ENGINE", engine).args(["commit", "f"]).status().unwrap().success());
        let o = env.bf().env("BF_IO_ENGINE", engine).args(["get", "f", "-o", "-"]).output().unwrap();
        assert_eq!(o.stdout, bytes, "{engine}");
        assert!(env.bf().env("BF_IO_ENGINE", engine).args(["verify"]).status().unwrap().success());
    }
    let env = Env::new();
    let err = String::from_utf8_lossy(&env.bf().env("BF_IO_ENGINE", "bogus").args(["ls"]).output().unwrap().stderr)
        .into_owned();
    assert!(err.contains("io_engine"), "{err}");
}

/// Soak (`cargo test -p bf --test e2e -- --ignored`): 100 000 small files (`BF_SOAK_FILES`) committed, half of
/// them removed, then m locations and the store directory lost: `bf recover` and a repairing scrub bring back
/// every remaining file byte-exact (every shard verified by scrub, a sample read back with `bf get`).
#[test]
#[ignore]
fn many_small_files_survive_losing_m_locations_and_the_store_directory() {
    let n: usize = std::env::var("BF_SOAK_FILES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let env = Env::new();
    env.init(4, 2);
    let body = |i: usize| data(100 + i % 3000, i as u64);
    for i in 0..n {
        env.write(&format!("t/d{}/f{i}", i % 100), &body(i));
    }
    env.ok(&["commit", "-r", "t"]);
    let removed: Vec<String> = (0..n).filter(|i| i % 2 == 1).map(|i| format!("t/d{}/f{i}", i % 100)).collect();
    for chunk in removed.chunks(10_000) {
        let mut args = vec!["rm"];
        args.extend(chunk.iter().map(String::as_str));
        env.ok(&args);
    }
    let key = env.path("backup.key");
    std::fs::rename(env.store().join("master.key"), &key).unwrap();
    for i in [1, 4] {
        std::fs::remove_dir_all(env.location(i)).unwrap();
        std::fs::create_dir(env.location(i)).unwrap();
    }
    let locations: Vec<PathBuf> = (0..6).map(|i| env.location(i)).collect();
    let kept = env.path("kept-locations");
    std::fs::create_dir(&kept).unwrap();
    for (i, l) in locations.iter().enumerate() {
        std::fs::rename(l, kept.join(format!("loc-{i:02}"))).unwrap();
    }
    std::fs::remove_dir_all(env.store()).unwrap();
    let keyf = key.to_str().unwrap().to_string();
    let mut args: Vec<String> = vec!["--key-file".into(), keyf.clone(), "recover".into()];
    for i in [5, 3, 1, 0, 2, 4] {
        args.push("--location".into());
        args.push(kept.join(format!("loc-{i:02}")).display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    env.ok(&args);
    let _ = env.run(&["--key-file", &keyf, "scrub", "--repair"]);
    let out = env.ok(&["--key-file", &keyf, "scrub"]);
    assert!(out.contains("result: healthy"), "{out}");
    let listed: serde_json::Value = serde_json::from_str(&env.ok(&["--key-file", &keyf, "ls", "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), n - removed.len());
    for i in (0..n).step_by(2).step_by((n / 1000).max(1)) {
        let o = env.run(&["--key-file", &keyf, "get", &format!("t/d{}/f{i}", i % 100), "-o", "-"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(o.stdout, body(i), "file {i}");
    }
}

/// Runs `bf args...` with its stdout a pipe whose reader is gone before `bf` writes (`bf ... | head -0`);
/// returns the exit status and stderr.
fn with_closed_stdout(env: &Env, args: &[&str]) -> (Option<i32>, String) {
    let mut child =
        env.bf().args(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!err.contains("panicked"), "bf {args:?} panicked: {err}");
    (o.status.code(), err)
}

/// A closed stdout ends the output, not the work, in every command: no panic, every file of a `commit -r`
/// committed, and a scrub's exit status still tells its result.
#[test]
fn a_closed_stdout_ends_the_output_not_the_work() {
    let env = Env::new();
    env.init(2, 1);
    for i in 0..300 {
        env.write(&format!("t/f{i:03}"), &data(100 + i, i as u64));
    }
    env.write("big", &data(20 * SEG, 7));
    let (code, err) = with_closed_stdout(&env, &["commit", "-r", "t", "big"]);
    assert_eq!(code, Some(0), "{err}");
    let listed: serde_json::Value = serde_json::from_str(&env.ok(&["ls", "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 301, "every file is committed");
    for args in [
        &["ls"][..],
        &["ls", "--json"],
        &["status"],
        &["status", "--json"],
        &["verify"],
        &["verify", "--json"],
        &["scrub"],
        &["scrub", "--json"],
        &["get", "big", "-o", "-"],
    ] {
        let (code, err) = with_closed_stdout(&env, args);
        assert_eq!(code, Some(0), "bf {args:?}: {err}");
    }
    std::fs::remove_file(&files_under(&env.location(1).join("shards"))[0]).unwrap();
    for args in [&["scrub"][..], &["scrub", "--json"]] {
        let (code, err) = with_closed_stdout(&env, args);
        assert_eq!(code, Some(3), "bf {args:?} finds the missing shard whatever stdout is: {err}");
    }
}

/// `get -o -` of a file with a segment beyond repair streams the segments before it (each verified), then
/// stops at that segment's start with exit 4 and says where; `-o /dev/null` and `-o DIR/` work.
#[test]
fn get_to_stdout_stops_at_the_first_segment_beyond_repair_and_says_where() {
    let env = Env::new();
    env.init(2, 1);
    env.write("f", &data(10 * SEG + 99, 3));
    env.ok(&["commit", "f"]);
    env.ok(&["get", "f", "-o", "/dev/null"]);
    std::fs::create_dir(env.path("out")).unwrap();
    env.ok(&["get", "f", "-o", "out"]);
    assert_eq!(std::fs::read(env.path("out/f")).unwrap(), data(10 * SEG + 99, 3));
    let seg5: Vec<PathBuf> = files_under(&env.store().join("locations"))
        .into_iter()
        .filter(|p| p.file_stem().is_some_and(|s| s == "0000000005"))
        .collect();
    assert_eq!(seg5.len(), 3, "{seg5:?}");
    for p in &seg5[..2] {
        std::fs::remove_file(p).unwrap();
    }
    let o = env.run(&["get", "f", "-o", "-"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert_eq!(o.stdout, data(10 * SEG + 99, 3)[..5 * SEG], "exactly the segments before the lost one");
    assert!(err.contains(&format!("stopped after {} bytes", 5 * SEG)), "{err}");
}

/// Names from a hostile or unusual tree: control characters are escaped in text output (JSON keeps them),
/// names that are not UTF-8 are refused one by one while the rest of the tree is committed, symbolic links are
/// stored as links, FIFOs are skipped with a word, and a name too long for a local file asks for `-o`.
#[test]
fn unusual_names_are_committed_escaped_refused_or_skipped_and_said_so() {
    use std::os::unix::ffi::OsStrExt;
    let env = Env::new();
    env.init(2, 1);
    let forged = "evil\n             9       1  healthy   0000000000000000  forged";
    env.write(&format!("t/{forged}"), b"x");
    env.write("t/plain", b"plain");
    for raw in [&b"a\xff"[..], b"b\xfe"] {
        std::fs::write(env.path("t").join(std::ffi::OsStr::from_bytes(raw)), b"latin-1").unwrap();
    }
    std::os::unix::fs::symlink("../elsewhere", env.path("t/link")).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(env.path("t/fifo")).status().unwrap().success());
    let o = env.run(&["commit", "-r", "t"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("2 entries were not committed") && err.contains("not UTF-8"), "{err}");
    assert!(err.contains("t/fifo") && err.contains("skipped"), "{err}");
    let ls = env.ok(&["ls"]);
    assert_eq!(ls.lines().count(), 3, "one line per entry, none forged: {ls}");
    assert!(ls.contains("t/evil\\n") && ls.contains("t/link -> ../elsewhere"), "{ls}");
    let json: serde_json::Value = serde_json::from_str(&env.ok(&["ls", "--json"])).unwrap();
    let names: Vec<&str> = json.as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert!(names.contains(&format!("t/{forged}").as_str()), "{names:?}");
    assert_eq!(env.ok(&["get", &format!("t/{forged}"), "-o", "-"]), "x");
    assert_eq!(env.ok(&["get", "t/plain", "-o", "-"]), "plain");
    // A last name part longer than a local file name may be.
    let long = format!("dir/{}", "n".repeat(300));
    env.write("src", b"long");
    env.ok(&["commit", "src", "--name", &long]);
    let err = env.fails(&["get", &long], 1);
    assert!(err.contains("give -o"), "{err}");
    env.ok(&["get", &long, "-o", "short"]);
    assert_eq!(std::fs::read(env.path("short")).unwrap(), b"long");
}
