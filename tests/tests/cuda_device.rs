//! Training on `cuda:0` against the CPU, same binary and seed: runs only with a CUDA build
//! (`WEIGHTGRAD_BIN`, as `.ci/run` sets it for its CUDA check) on a host with a GPU, and
//! says why it skipped otherwise.

use serde_json::Value;
use weightgrad_tests::{last_json_line, weightgrad, weightgrad_ok};

/// A few hundred steps of the digits MLP and of the wide MLP on `device`.
fn train(device: &str, model: &str) -> Value {
    last_json_line(&weightgrad_ok(&[
        "train", "--model", model, "--epochs", "2", "--seed", "0", "--device", device, "--json",
    ]))
}

#[test]
fn training_on_the_gpu_follows_the_cpu_run_of_the_same_seed() {
    let version = String::from_utf8_lossy(&weightgrad_ok(&["--version"]).stdout).into_owned();
    if !version.contains("features: cuda") {
        eprintln!("skipped: {} is not a CUDA build", version.trim());
        return;
    }
    let probe = weightgrad(&[
        "train", "--model", "mlp:8", "--epochs", "1", "--device", "cuda:0",
    ]);
    if !probe.status.success() {
        let err = String::from_utf8_lossy(&probe.stderr);
        // No GPU here: the error must still say which device and why.
        assert!(
            err.contains("--device cuda:0: cannot open the GPU"),
            "{err}"
        );
        eprintln!(
            "skipped: no CUDA device ({})",
            err.lines().next().unwrap_or("")
        );
        return;
    }
    for model in ["mlp", "mlp:1024,1024"] {
        let (gpu, cpu) = (train("cuda:0", model), train("cpu", model));
        let loss = |v: &Value| v["test_loss"].as_f64().unwrap();
        let acc = |v: &Value| v["test_accuracy"].as_f64().unwrap();
        // Float sums run in another order on the GPU: the runs drift apart a little, not
        // more than 5% in loss or 2 points of top-1 after two epochs.
        assert!(
            (loss(&gpu) - loss(&cpu)).abs() <= 0.05 * loss(&cpu),
            "{model}: test loss {} on cuda:0 against {} on the CPU",
            loss(&gpu),
            loss(&cpu)
        );
        assert!(
            (acc(&gpu) - acc(&cpu)).abs() <= 0.02,
            "{model}: top-1 {} on cuda:0 against {} on the CPU",
            acc(&gpu),
            acc(&cpu)
        );
    }
}
