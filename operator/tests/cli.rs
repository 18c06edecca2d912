//! `widget-operator crd` prints exactly the committed CRD.

use std::process::Command;

#[test]
fn crd_command_prints_the_committed_crd() {
    let out = Command::new(env!("CARGO_BIN_EXE_widget-operator"))
        .arg("crd")
        .output()
        .expect("run widget-operator crd");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/widgetpipelines.homewidgets.io.yaml"
    ))
    .expect("read committed CRD");
    assert_eq!(String::from_utf8_lossy(&out.stdout), committed);
}

#[test]
fn run_without_a_cluster_fails_with_a_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_widget-operator"))
        .args(["run", "--no-leader-election"])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("run widget-operator run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Kubernetes"), "{stderr}");
}
