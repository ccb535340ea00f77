//! Crash safety: `kill -9` at random moments while several associations store.
//! Every instance that got status 0000 must be present and intact after a restart.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kade_dimse::scu::ScuAssociation;
use kade_testkit::{r#gen, part10::Part10, tools};

use crate::common::{Node, backends};

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const ELE: &str = "1.2.840.10008.1.2.1";

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_instances_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = r#gen::CtSpec::small(4, 60);
    spec.size = 256;
    let files: Vec<Part10> = r#gen::ct_study(dir.path(), &spec)
        .iter()
        .map(|f| Part10::read(f).unwrap())
        .collect();
    for b in backends() {
        let mut node = Node::start(&b).await;
        let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
        for round in 0..4u64 {
            let tasks: Vec<_> = files
                .chunks(files.len() / 4)
                .map(|chunk| {
                    let (chunk, addr, acked) = (chunk.to_vec(), node.addr(), acked.clone());
                    tokio::spawn(async move {
                        let prop = vec![(CT.to_string(), vec![ELE.to_string()])];
                        let Ok(mut a) =
                            ScuAssociation::connect(addr, "STORESCU", "KADE", &prop).await
                        else {
                            return;
                        };
                        for p in chunk {
                            if acked.lock().unwrap().contains(&p.sop_instance) {
                                continue;
                            }
                            match a.store(CT, &p.sop_instance, &p.dataset).await {
                                Ok(0) => {
                                    acked.lock().unwrap().insert(p.sop_instance.clone());
                                }
                                Ok(other) => panic!("unexpected status {other:04X}"),
                                Err(_) => return, // the server died under us
                            }
                        }
                        let _ = a.release().await;
                    })
                })
                .collect();
            // Kill at a different moment each round, while stores are in flight.
            tokio::time::sleep(Duration::from_millis(150 + 170 * round)).await;
            node.kill9();
            for t in tasks {
                t.await.unwrap();
            }
            node.spawn();
        }
        let acked = acked.lock().unwrap().clone();
        assert!(
            !acked.is_empty(),
            "[{}] nothing was acknowledged before the kills",
            b.name
        );
        let index = node.index().await;
        for sop in &acked {
            assert!(
                index.instance(sop).await.unwrap().is_some(),
                "[{}] acknowledged {sop} lost",
                b.name
            );
        }
        let verify = node.cli(&["verify"]);
        assert!(
            verify.status.success(),
            "[{}] verify: {}",
            b.name,
            tools::text(&verify)
        );
        let repair = node.cli(&["fsck", "--repair", "--min-age", "0"]);
        assert!(
            repair.status.success(),
            "[{}] fsck --repair: {}",
            b.name,
            tools::text(&repair)
        );
        let fsck = node.cli(&["fsck", "--min-age", "0"]);
        assert!(
            fsck.status.success(),
            "[{}] fsck: {}",
            b.name,
            tools::text(&fsck)
        );
        assert!(
            node.cli(&["audit", "verify"]).status.success(),
            "[{}] audit chain",
            b.name
        );
        eprintln!(
            "[{}] {} of {} instances acknowledged across 4 kills",
            b.name,
            acked.len(),
            files.len()
        );
    }
}
