//! `ops/broker.sh`, the local broker of the tests and the quick start: many starters at once
//! share one broker, a stop is clean, and a restart keeps the data, also after a crash.

mod common;

use std::time::Duration;

use common::*;
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer},
};

fn topics(addr: &str) -> Vec<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    metadata
        .topics()
        .iter()
        .map(|t| t.name().to_string())
        .collect()
}

/// The pid in the broker's pid file.
fn pid(broker: &OwnBroker) -> String {
    let kind = std::env::var("AGENTBUS_LOCAL_BROKER").unwrap_or_else(|_| "kafka".into());
    std::fs::read_to_string(broker.dir.path().join(kind).join("broker.pid"))
        .unwrap()
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn parallel_starts_share_one_broker_and_a_restart_keeps_its_topics() {
    let Some(broker) = OwnBroker::start().await else {
        return;
    };
    let first = pid(&broker);

    // Six starters at once, as six test binaries would: each gets the address, one broker.
    let starters: Vec<_> = (0..6)
        .map(|_| {
            let mut cmd = broker.command("start");
            std::thread::spawn(move || cmd.output().unwrap())
        })
        .collect();
    for starter in starters {
        let out = starter.join().unwrap();
        assert_eq!(succeeded(&out).trim(), broker.addr);
    }
    assert_eq!(pid(&broker), first, "a second broker was started");

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .create()
        .unwrap();
    let name = format!("kept-{}", uuid::Uuid::new_v4().simple());
    let created = admin
        .create_topics(
            &[NewTopic::new(&name, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    assert!(created[0].is_ok(), "{created:?}");
    drop(admin);

    // Stop: the process is gone and the port answers no more.
    broker.run("stop").await;
    let pid_alive = std::path::Path::new(&format!("/proc/{first}")).exists();
    assert!(!pid_alive, "the broker process {first} outlived its stop");
    let status = broker.command("status").output().unwrap();
    assert!(!status.status.success(), "status says up after a stop");
    assert!(
        std::net::TcpStream::connect(&broker.addr).is_err(),
        "something still listens on {}",
        broker.addr
    );
    if std::env::var("AGENTBUS_LOCAL_BROKER").is_err() {
        // Kafka shut down in order rather than being killed: it marks its log directory
        // clean (no log recovery at the restart).
        let marker = broker.dir.path().join("kafka/logs/.kafka_cleanshutdown");
        assert!(
            marker.exists(),
            "no clean shutdown marker: {}",
            broker.log()
        );
    }

    // Started again on the same data: the topic is still there.
    assert_eq!(broker.run("start").await, broker.addr);
    assert_ne!(pid(&broker), first);
    let addr = broker.addr.clone();
    let listed = tokio::task::spawn_blocking(move || topics(&addr))
        .await
        .unwrap();
    assert!(
        listed.contains(&name),
        "{name} lost at the restart: {listed:?}"
    );

    // Killed (a crash, an OOM kill): the next start starts it again on the same data.
    let crashed = pid(&broker);
    let killed = std::process::Command::new("kill")
        .args(["-9", &crashed])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{crashed}")).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "kill -9 did not end {crashed}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(broker.run("start").await, broker.addr);
    let addr = broker.addr.clone();
    let listed = tokio::task::spawn_blocking(move || topics(&addr))
        .await
        .unwrap();
    assert!(
        listed.contains(&name),
        "{name} lost after a crash: {listed:?}"
    );
}
