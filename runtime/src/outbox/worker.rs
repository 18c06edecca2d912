//! The outbox-worker (relay).
