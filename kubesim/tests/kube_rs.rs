//! kubesim driven by kube-rs, as the agent will drive real clusters: typed and dynamic APIs,
//! discovery, watches (with re-list after 410), server-side apply conflicts, status, finalizers.
// Test helpers panic on failure: the panic message is the test report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::discovery::{Discovery, Scope};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use kubesim::{ClusterSettings, Faults, Sim, SimOptions};
use serde_json::json;

async fn sim(settings: ClusterSettings) -> (Sim, Client) {
    let sim = Sim::start(SimOptions {
        settings,
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let client = Client::try_from(sim.kube_config("kubesim").await.unwrap()).unwrap();
    (sim, client)
}

fn cm(name: &str, labels: serde_json::Value) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}),
    )
    .unwrap()
}

fn api_code(err: kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(status) => (status.code, status.reason.clone()),
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test]
async fn typed_crud_selectors_pagination_and_errors() {
    let (_sim, client) = sim(ClusterSettings::default()).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();
    cms.create(&pp, &cm("a", json!({"app": "web", "tier": "front"})))
        .await
        .unwrap();
    cms.create(&pp, &cm("b", json!({"app": "web", "tier": "back"})))
        .await
        .unwrap();
    cms.create(&pp, &cm("c", json!({"app": "db"})))
        .await
        .unwrap();

    let names = |list: kube::api::ObjectList<ConfigMap>| {
        list.items.iter().map(|c| c.name_any()).collect::<Vec<_>>()
    };
    assert_eq!(
        names(
            cms.list(&ListParams::default().labels("app=web"))
                .await
                .unwrap()
        ),
        ["a", "b"]
    );
    assert_eq!(
        names(
            cms.list(&ListParams::default().labels("tier in (back),app"))
                .await
                .unwrap()
        ),
        ["b"]
    );
    assert_eq!(
        names(
            cms.list(&ListParams::default().labels("!tier"))
                .await
                .unwrap()
        ),
        ["c"]
    );
    assert_eq!(
        names(
            cms.list(&ListParams::default().fields("metadata.name=c"))
                .await
                .unwrap()
        ),
        ["c"]
    );

    // limit/continue
    let first = cms.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(names(first.clone()), ["a", "b"]);
    let token = first.metadata.continue_.clone().expect("continue token");
    let rest = cms
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(names(rest.clone()), ["c"]);
    assert!(rest.metadata.continue_.is_none());

    // Errors as the API server reports them.
    assert_eq!(
        api_code(cms.create(&pp, &cm("a", json!({}))).await.unwrap_err()),
        (409, "AlreadyExists".into())
    );
    assert_eq!(
        api_code(cms.get("nope").await.unwrap_err()),
        (404, "NotFound".into())
    );
    assert_eq!(
        api_code(
            cms.create(&pp, &cm("Bad_Name", json!({})))
                .await
                .unwrap_err()
        ),
        (422, "Invalid".into())
    );
    let missing_ns: Api<ConfigMap> = Api::namespaced(client.clone(), "nope");
    let (code, _) = api_code(
        missing_ns
            .create(&pp, &cm("x", json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 404);

    // Optimistic concurrency: a stale resourceVersion is a 409 Conflict.
    let mut a = cms.get("a").await.unwrap();
    let stale = a.clone();
    a.data = Some([("k".to_string(), "v2".to_string())].into());
    let updated = cms.replace("a", &pp, &a).await.unwrap();
    assert_ne!(updated.resource_version(), stale.resource_version());
    assert_eq!(
        api_code(cms.replace("a", &pp, &stale).await.unwrap_err()),
        (409, "Conflict".into())
    );
    // resourceVersions grow monotonically across the cluster.
    let rv = |c: &ConfigMap| c.resource_version().unwrap().parse::<u64>().unwrap();
    let c = cms.get("c").await.unwrap();
    assert!(rv(&updated) > rv(&c));
}

#[tokio::test]
async fn server_side_apply_conflicts_force_and_field_removal() {
    let (_sim, client) = sim(ClusterSettings::default()).await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let config = |data: serde_json::Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "s"}, "data": data});
    let created = cms
        .patch(
            "s",
            &PatchParams::apply("agent"),
            &Patch::Apply(config(json!({"a": "1", "b": "2"}))),
        )
        .await
        .unwrap();
    assert_eq!(created.managed_fields().len(), 1);
    assert_eq!(
        created.managed_fields()[0].manager.as_deref(),
        Some("agent")
    );

    // Another manager sets a different value: conflict, then force.
    let err = cms
        .patch(
            "s",
            &PatchParams::apply("other"),
            &Patch::Apply(config(json!({"a": "9"}))),
        )
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(s) => {
            assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
            assert!(
                s.message.contains("conflict with \"agent\"") && s.message.contains(".data.a"),
                "{}",
                s.message
            );
        }
        other => panic!("{other}"),
    }
    let forced = cms
        .patch(
            "s",
            &PatchParams::apply("other").force(),
            &Patch::Apply(config(json!({"a": "9"}))),
        )
        .await
        .unwrap();
    assert_eq!(forced.data.as_ref().unwrap()["a"], "9");

    // The agent stops applying b: it is removed. a now belongs to "other" and stays.
    let after = cms
        .patch(
            "s",
            &PatchParams::apply("agent").force(),
            &Patch::Apply(config(json!({}))),
        )
        .await
        .unwrap();
    let data = after.data.unwrap_or_default();
    assert!(!data.contains_key("b"), "{data:?}");
    assert_eq!(data["a"], "9");

    // Apply through kube with a merge patch records an Update manager.
    let patched = cms
        .patch(
            "s",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"c": "3"}})),
        )
        .await
        .unwrap();
    assert!(
        patched
            .managed_fields()
            .iter()
            .any(|m| m.operation.as_deref() == Some("Update"))
    );
}

#[tokio::test]
async fn crd_discovery_dynamic_objects_status_and_crd_deletion() {
    let (_sim, client) = sim(ClusterSettings::default()).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "metadata": {"name": "widgets.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
                 "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
                 "versions": [{"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
                               "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}
    })).unwrap();
    crds.create(&PostParams::default(), &crd).await.unwrap();
    let established = crds.get("widgets.example.com").await.unwrap();
    let conditions = established.status.unwrap().conditions.unwrap();
    assert!(
        conditions
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
    );

    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let (ar, caps) = discovery
        .groups()
        .flat_map(|g| g.recommended_resources())
        .find(|(ar, _)| ar.kind == "Widget")
        .expect("Widget discovered");
    assert_eq!(caps.scope, Scope::Namespaced);
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    let w: DynamicObject =
        serde_json::from_value(json!({"apiVersion": "example.com/v1", "kind": "Widget",
        "metadata": {"name": "w1"}, "spec": {"size": 1}, "status": {"ignored": true}}))
        .unwrap();
    let created = widgets.create(&PostParams::default(), &w).await.unwrap();
    assert!(
        created.data.get("status").is_none(),
        "status is a subresource: create ignores it"
    );
    assert_eq!(created.metadata.generation, Some(1));

    let with_status = widgets
        .patch_status(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"ready": true}, "spec": {"size": 99}})),
        )
        .await
        .unwrap();
    assert_eq!(with_status.data["status"]["ready"], true);
    assert_eq!(
        with_status.data["spec"]["size"], 1,
        "a status write does not change spec"
    );
    assert_eq!(with_status.metadata.generation, Some(1));
    let bumped = widgets
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 2}})),
        )
        .await
        .unwrap();
    assert_eq!(bumped.metadata.generation, Some(2));
    let relabeled = widgets
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        relabeled.metadata.generation,
        Some(2),
        "metadata changes do not bump generation"
    );

    crds.delete("widgets.example.com", &DeleteParams::default())
        .await
        .unwrap();
    let (code, _) = api_code(widgets.get("w1").await.unwrap_err());
    assert_eq!(code, 404);
}

#[tokio::test]
async fn watcher_relists_after_410_and_raw_watch_reports_expiry() {
    let (sim, client) = sim(ClusterSettings {
        history: 5,
        ..ClusterSettings::default()
    })
    .await;
    let cluster = sim.cluster("kubesim").unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &cm("w", json!({})))
        .await
        .unwrap();
    let start_rv = cms.get("w").await.unwrap().resource_version().unwrap();

    let mut stream = watcher(cms.clone(), watcher::Config::default()).boxed();
    let mut inits = 0;
    let mut seen_w = false;
    // Initial list.
    while let Some(event) = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        match event {
            watcher::Event::Init => inits += 1,
            watcher::Event::InitApply(o) => seen_w |= o.name_any() == "w",
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!((inits, seen_w), (1, true));

    // Cut the watch, and write more than the history holds so its resourceVersion expires.
    for i in 0..10 {
        cms.create(&PostParams::default(), &cm(&format!("x{i}"), json!({})))
            .await
            .unwrap();
    }
    cluster.drop_all_watches();
    // kube's watcher surfaces the 410 as an error item, then re-lists on the next poll.
    let (saw_410, relisted) = tokio::time::timeout(Duration::from_secs(10), async {
        let mut saw_410 = false;
        while let Some(item) = stream.next().await {
            match item {
                Err(watcher::Error::WatchError(status)) if status.code == 410 => saw_410 = true,
                Err(other) => panic!("unexpected watcher error {other}"),
                Ok(watcher::Event::InitApply(o)) if o.name_any() == "x9" => return (saw_410, true),
                Ok(_) => {}
            }
        }
        (saw_410, false)
    })
    .await
    .unwrap();
    assert!(saw_410, "the resumed watch got 410 Gone");
    assert!(
        relisted,
        "watcher re-listed after the expired resourceVersion"
    );

    // A raw watch from the expired version gets an ERROR event with 410.
    let mut raw = cms
        .watch(&WatchParams::default(), &start_rv)
        .await
        .unwrap()
        .boxed();
    match raw.try_next().await.unwrap() {
        Some(WatchEvent::Error(e)) => assert_eq!(e.code, 410),
        other => panic!("expected 410, got {other:?}"),
    }
}

#[tokio::test]
async fn watch_streams_changes_in_order_with_initial_events_bookmark() {
    let (_sim, client) = sim(ClusterSettings::default()).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &cm("before", json!({"app": "x"})))
        .await
        .unwrap();
    let mut stream = cms
        .watch(&WatchParams::streaming_lists().labels("app=x"), "0")
        .await
        .unwrap()
        .boxed();
    let mut initial_end = false;
    while let Some(ev) = stream.try_next().await.unwrap() {
        match ev {
            WatchEvent::Added(o) => assert_eq!(o.name_any(), "before"),
            WatchEvent::Bookmark(b) => {
                initial_end = b
                    .metadata
                    .annotations
                    .contains_key("k8s.io/initial-events-end");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(initial_end);
    cms.create(&PostParams::default(), &cm("other", json!({"app": "y"})))
        .await
        .unwrap();
    cms.create(&PostParams::default(), &cm("after", json!({"app": "x"})))
        .await
        .unwrap();
    cms.delete("after", &DeleteParams::default()).await.unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), stream.try_next())
            .await
            .unwrap()
            .unwrap()
        {
            Some(WatchEvent::Added(o)) => kinds.push(format!("ADDED {}", o.name_any())),
            Some(WatchEvent::Deleted(o)) => kinds.push(format!("DELETED {}", o.name_any())),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        kinds,
        ["ADDED after", "DELETED after"],
        "the label selector filters the watch"
    );
}

#[tokio::test]
async fn workloads_become_available_and_broken_ones_fail_their_deadline() {
    let (_sim, client) = sim(ClusterSettings {
        ready_delay: Duration::from_millis(100),
        ..ClusterSettings::default()
    })
    .await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let d = |name: &str, image: &str| -> Deployment {
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": image}]}}}})).unwrap()
    };
    deploys
        .create(&PostParams::default(), &d("good", "nginx:1"))
        .await
        .unwrap();
    deploys
        .create(&PostParams::default(), &d("bad", "nginx:broken"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let good = deploys.get("good").await.unwrap().status.unwrap();
    assert_eq!(good.available_replicas, Some(2));
    assert_eq!(good.observed_generation, Some(1));
    let bad = deploys.get("bad").await.unwrap().status.unwrap();
    let progressing = bad
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Progressing")
        .unwrap();
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_deref()),
        ("False", Some("ProgressDeadlineExceeded"))
    );

    // The selector is immutable.
    let mut changed = deploys.get("good").await.unwrap();
    changed.spec.as_mut().unwrap().selector.match_labels =
        Some([("app".to_string(), "other".to_string())].into());
    let (code, reason) = api_code(
        deploys
            .replace("good", &PostParams::default(), &changed)
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
}

#[tokio::test]
async fn finalizers_hold_deletion_and_namespaces_cascade() {
    let (_sim, client) = sim(ClusterSettings::default()).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "team"}})).unwrap(),
        )
        .await
        .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "team");
    let mut held = cm("held", json!({}));
    held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    cms.create(&PostParams::default(), &held).await.unwrap();
    cms.create(&PostParams::default(), &cm("plain", json!({})))
        .await
        .unwrap();

    namespaces
        .delete("team", &DeleteParams::default())
        .await
        .unwrap();
    let ns = namespaces.get("team").await.unwrap();
    assert_eq!(ns.status.unwrap().phase.as_deref(), Some("Terminating"));
    assert_eq!(api_code(cms.get("plain").await.unwrap_err()).0, 404);
    let pending = cms.get("held").await.unwrap();
    assert!(pending.metadata.deletion_timestamp.is_some());

    cms.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert_eq!(api_code(cms.get("held").await.unwrap_err()).0, 404);
    assert_eq!(api_code(namespaces.get("team").await.unwrap_err()).0, 404);
}

#[tokio::test]
async fn injected_faults_reach_the_client() {
    let (sim, client) = sim(ClusterSettings::default()).await;
    let cluster = sim.cluster("kubesim").unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cluster.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    let (code, _) = api_code(cms.list(&ListParams::default()).await.unwrap_err());
    assert!(code == 500 || code == 429, "{code}");
    cluster.set_faults(Faults {
        unresponsive: true,
        ..Faults::default()
    });
    let hung =
        tokio::time::timeout(Duration::from_millis(500), cms.list(&ListParams::default())).await;
    assert!(hung.is_err(), "an unresponsive cluster does not answer");
    cluster.set_faults(Faults::default());
    cms.list(&ListParams::default()).await.unwrap();
}

#[tokio::test]
async fn a_selector_watch_sees_objects_leave_and_enter_its_selection() {
    let (_sim, client) = sim(ClusterSettings::default()).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &cm("m", json!({"app": "x"})))
        .await
        .unwrap();
    let rv = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = cms
        .watch(&WatchParams::default().labels("app=x"), &rv)
        .await
        .unwrap()
        .boxed();
    let relabel = |app: &'static str| {
        let cms = cms.clone();
        async move {
            let patch = json!({"metadata": {"labels": {"app": app}}});
            cms.patch("m", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap()
        }
    };
    // Stops matching: DELETED, carrying the object as it was, at the new resourceVersion.
    let left = relabel("y").await;
    match tokio::time::timeout(Duration::from_secs(5), stream.try_next()).await {
        Ok(Ok(Some(WatchEvent::Deleted(o)))) => {
            assert_eq!(o.name_any(), "m");
            assert_eq!(o.labels()["app"], "x", "the object as it last matched");
            assert_eq!(o.resource_version(), left.resource_version());
        }
        other => panic!("expected DELETED, got {other:?}"),
    }
    // A change while it does not match: nothing.
    let patch = json!({"data": {"k": "changed"}});
    cms.patch("m", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    // Matches again: ADDED.
    relabel("x").await;
    match tokio::time::timeout(Duration::from_secs(5), stream.try_next()).await {
        Ok(Ok(Some(WatchEvent::Added(o)))) => assert_eq!(o.labels()["app"], "x"),
        other => panic!("expected ADDED, got {other:?}"),
    }
    // Still matching: MODIFIED.
    let patch = json!({"data": {"k": "again"}});
    cms.patch("m", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(5), stream.try_next()).await {
        Ok(Ok(Some(WatchEvent::Modified(o)))) => {
            assert_eq!(o.data.unwrap()["k"], "again")
        }
        other => panic!("expected MODIFIED, got {other:?}"),
    }
}

#[tokio::test]
async fn the_scale_subresource_reads_and_writes_replicas() {
    let (_sim, client) = sim(ClusterSettings::default()).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}}}
    }))
    .unwrap();
    deploys.create(&PostParams::default(), &d).await.unwrap();
    let scale = deploys.get_scale("web").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(1));
    assert_eq!(scale.status.unwrap().selector.as_deref(), Some("app=web"));
    let patch = json!({"spec": {"replicas": 4}});
    let scaled = deploys
        .patch_scale("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(scaled.spec.unwrap().replicas, Some(4));
    assert_eq!(
        deploys.get("web").await.unwrap().spec.unwrap().replicas,
        Some(4)
    );
    // Negative replicas are refused as a real server refuses them.
    let bad = json!({"spec": {"replicas": -1}});
    let err = deploys
        .patch_scale("web", &PatchParams::default(), &Patch::Merge(&bad))
        .await
        .unwrap_err();
    assert_eq!(api_code(err).0, 422);
    // Discovery advertises it.
    let discovery = Discovery::new(client).run().await.unwrap();
    let apps = discovery.get("apps").unwrap();
    let (_, caps) = apps
        .recommended_resources()
        .into_iter()
        .find(|(r, _)| r.kind == "Deployment")
        .unwrap();
    assert!(
        caps.subresources.iter().any(|(r, _)| r.plural == "scale"),
        "{caps:?}"
    );
}
