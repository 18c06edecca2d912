//! End-to-end suite against a kind cluster (see e2e/README.md).
