//! The host sysctls the agent needs (`net.ipv4.ip_forward`) are changed only when they differ,
//! and a graceful stop that leaves nothing on the host relying on them puts back the host's
//! own values. A file of its own: it turns forwarding off for a moment, which no other test of
//! this binary could live with.

mod support;

use std::path::Path;

use support::agent::stack;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

fn forwarding() -> String {
    std::fs::read_to_string(IP_FORWARD)
        .unwrap()
        .trim()
        .to_owned()
}

/// Puts the host's forwarding back whatever the test did.
struct HostForwarding(String);

impl Drop for HostForwarding {
    fn drop(&mut self) {
        std::fs::write(IP_FORWARD, &self.0).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ip_forward_is_changed_only_when_needed_and_restored_at_a_graceful_stop() {
    let _host = HostForwarding(forwarding());
    std::fs::write(IP_FORWARD, "0").unwrap();
    let (cp, agent, _host_id, _admin) = stack().await;
    let agent = tokio::task::spawn_blocking(move || {
        let mut agent = agent;
        let record = agent.root.path().join("host-sysctls.json");
        assert_eq!(forwarding(), "1");
        let recorded = std::fs::read_to_string(&record).unwrap();
        assert!(
            recorded.contains(r#""net/ipv4/ip_forward": "0""#),
            "{recorded}"
        );
        // Namespaces of other agents (or other software) may rely on forwarding: then it stays.
        let others = std::fs::read_dir("/run/netns").is_ok_and(|mut d| d.next().is_some());
        agent.stop();
        if others {
            assert_eq!(forwarding(), "1");
            assert!(agent.log().contains("other network namespaces remain"));
        } else {
            assert_eq!(forwarding(), "0");
            assert!(!record.exists());
        }

        // Found as needed: neither written nor recorded, so nothing to restore.
        std::fs::write(IP_FORWARD, "1").unwrap();
        let _ = std::fs::remove_file(&record);
        agent.restart(None);
        assert!(!Path::new(&record).exists());
        agent.stop();
        assert_eq!(forwarding(), "1");
        agent
    })
    .await
    .unwrap();
    drop(agent);
    cp.stop().await;
}
