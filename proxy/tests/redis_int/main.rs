//! Integration tests: the real `shotover` binary between real clients and a real Redis
//! (started by `e2e/services up redis redis-tls`).

mod backpressure;
mod cluster;
mod failures;
#[path = "../support/fault.rs"]
mod fault;
mod faults;
mod helpers;
mod lifecycle;
mod passthrough;
#[path = "../support/process.rs"]
mod process;
mod reload;
mod shared;
mod transforms;
