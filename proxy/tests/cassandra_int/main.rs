//! Integration tests: the real `shotover` binary between real CQL clients (the DataStax
//! Python driver, raw frames) and a real Apache Cassandra (started by
//! `e2e/services up cassandra cassandra-auth-tls`).

mod drivers;
#[path = "../support/fault.rs"]
mod fault;
mod faults;
mod helpers;
#[path = "../support/process.rs"]
mod process;
mod protocol;
mod transforms;
