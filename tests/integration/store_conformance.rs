//! The event store contract, written once against the `EventStore` trait and
//! run on every backend: SQLite always, PostgreSQL when `DATABASE_URL` is set.

use std::sync::Arc;

use futures::future::join_all;
use orchestrix_host::metrics::Metrics;
use orchestrix_host::store::{
    AppendOutcome, AppendRequest, EventData, EventMetadata, EventStore, ExpectedVersion, PostgresStore, SqliteStore,
    StoreError, StoreOptions, StoredEvent, StreamId, StreamRange,
};

use crate::support::{database_url, drop_schema, fresh_schema};

const LIMIT: usize = 16 * 1024;

/// One backend under test, on fresh, private storage.
pub struct Backend {
    pub name: &'static str,
    pub store: Arc<dyn EventStore>,
    storage: Storage,
}

enum Storage {
    /// Removed on drop.
    Directory {
        _dir: tempfile::TempDir,
    },
    Schema {
        url: String,
        schema: String,
    },
}

impl Backend {
    /// Close the store and remove its storage.
    pub async fn finish(self) {
        self.store.close().await;
        if let Storage::Schema { url, schema } = self.storage {
            drop_schema(&url, &schema).await;
        }
    }
}

pub fn options() -> StoreOptions {
    StoreOptions { max_event_bytes: LIMIT, ..StoreOptions::default() }
}

/// A PostgreSQL store on `schema` of the server at `url`.
pub async fn open_postgres(url: &str, schema: &str) -> Arc<dyn EventStore> {
    let options = StoreOptions { schema: Some(schema.to_owned()), ..options() };
    Arc::new(PostgresStore::open(url, &options, Metrics::new()).await.expect("PostgreSQL store opens"))
}

/// Every backend under test, each on fresh, private storage.
pub async fn backends(test: &str) -> Vec<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("conformance.db").display());
    let sqlite = SqliteStore::open(&url, &options(), Metrics::new()).await.expect("sqlite opens");
    let mut backends =
        vec![Backend { name: "sqlite", store: Arc::new(sqlite), storage: Storage::Directory { _dir: dir } }];
    if let Some(url) = database_url(test) {
        let schema = fresh_schema(&url).await;
        let store = open_postgres(&url, &schema).await;
        backends.push(Backend { name: "postgres", store, storage: Storage::Schema { url, schema } });
    }
    backends
}

/// An append of events of the given types to one stream.
pub fn append(stream: &StreamId, expected: ExpectedVersion, types: &[&str]) -> AppendRequest {
    AppendRequest {
        stream: stream.clone(),
        expected,
        events: types
            .iter()
            .map(|t| EventData { event_type: (*t).into(), schema_version: 1, data: format!(r#"{{"kind":"{t}"}}"#) })
            .collect(),
        metadata: EventMetadata { module: "test".into(), module_version: "1.0.0".into(), ..EventMetadata::default() },
        command_id: None,
    }
}

fn appended(outcome: Result<AppendOutcome, StoreError>) -> Vec<StoredEvent> {
    match outcome {
        Ok(AppendOutcome::Appended(events)) => events,
        other => panic!("expected an append, got {other:?}"),
    }
}

#[tokio::test]
async fn expected_version_variants() {
    for backend in backends("expected_version_variants").await {
        let (name, store) = (backend.name, backend.store.clone());
        let s = StreamId::new("t", "ev");
        let first = appended(store.append(append(&s, ExpectedVersion::NoStream, &["A", "B"])).await);
        assert_eq!(first.iter().map(|e| e.version).collect::<Vec<_>>(), [1, 2], "{name}");
        assert!(
            matches!(
                store.append(append(&s, ExpectedVersion::NoStream, &["C"])).await,
                Err(StoreError::Conflict { actual: 2, .. })
            ),
            "{name}: NoStream on an existing stream"
        );
        assert!(
            matches!(
                store.append(append(&s, ExpectedVersion::Exact(1), &["C"])).await,
                Err(StoreError::Conflict { actual: 2, .. })
            ),
            "{name}: stale exact version"
        );
        appended(store.append(append(&s, ExpectedVersion::Exact(2), &["C"])).await);
        let any = appended(store.append(append(&s, ExpectedVersion::Any, &["D"])).await);
        assert_eq!(any[0].version, 4, "{name}");
        assert!(
            matches!(
                store.append(append(&StreamId::new("t", "new"), ExpectedVersion::Exact(3), &["A"])).await,
                Err(StoreError::Conflict { actual: 0, .. })
            ),
            "{name}: exact version on a missing stream"
        );
        backend.finish().await;
    }
}

#[tokio::test]
async fn idempotent_command_ids() {
    for backend in backends("idempotent_command_ids").await {
        let (name, store) = (backend.name, backend.store.clone());
        let s = StreamId::new("t", "idem");
        let mut request = append(&s, ExpectedVersion::Any, &["A", "B"]);
        request.command_id = Some("cmd-1".into());
        let events = appended(store.append(request.clone()).await);
        match store.append(request.clone()).await {
            Ok(AppendOutcome::Duplicate(record)) => {
                assert_eq!(
                    (record.first_position, record.last_position, record.version),
                    (events[0].position, events[1].position, 2),
                    "{name}"
                );
            }
            other => panic!("{name}: expected a duplicate, got {other:?}"),
        }
        assert_eq!(store.read_all(0, 100).await.unwrap().len(), 2, "{name}: nothing appended twice");
        let found = store.find_command("cmd-1").await.unwrap().expect("recorded");
        assert_eq!(found.stream, s);
        let mut elsewhere = append(&StreamId::new("t", "other"), ExpectedVersion::Any, &["A"]);
        elsewhere.command_id = Some("cmd-1".into());
        assert!(matches!(store.append(elsewhere).await, Err(StoreError::CommandIdReused(_))), "{name}");
        assert!(store.find_command("never").await.unwrap().is_none());
        backend.finish().await;
    }
}

#[tokio::test]
async fn stream_reads_by_version_range_and_time() {
    for backend in backends("stream_reads_by_version_range_and_time").await {
        let (name, store) = (backend.name, backend.store.clone());
        let s = StreamId::new("t", "range");
        let early = appended(store.append(append(&s, ExpectedVersion::Any, &["A", "B", "C"])).await);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        appended(store.append(append(&s, ExpectedVersion::Any, &["D", "E"])).await);
        let versions = |events: Vec<StoredEvent>| events.iter().map(|e| e.version).collect::<Vec<_>>();
        assert_eq!(versions(store.read_stream(&s, StreamRange::all()).await.unwrap()), [1, 2, 3, 4, 5], "{name}");
        assert_eq!(versions(store.read_stream(&s, StreamRange::after(3)).await.unwrap()), [4, 5], "{name}");
        let middle = StreamRange { from_version: 2, to_version: Some(4), until: None };
        assert_eq!(versions(store.read_stream(&s, middle).await.unwrap()), [2, 3, 4], "{name}");
        let until = StreamRange { from_version: 1, to_version: None, until: Some(early[0].time) };
        assert_eq!(versions(store.read_stream(&s, until).await.unwrap()), [1, 2, 3], "{name}");
        assert!(store.read_stream(&StreamId::new("t", "none"), StreamRange::all()).await.unwrap().is_empty());
        // Several streams at once, grouped in the order asked, each in version order.
        let other = StreamId::new("t", "range-2");
        appended(store.append(append(&other, ExpectedVersion::Any, &["X"])).await);
        let grouped = store.read_streams(&[other.clone(), StreamId::new("t", "none"), s.clone()]).await.unwrap();
        let shape: Vec<Vec<u64>> = grouped.iter().map(|events| events.iter().map(|e| e.version).collect()).collect();
        assert_eq!(shape, [vec![1], vec![], vec![1, 2, 3, 4, 5]], "{name}");
        assert!(grouped[2].iter().all(|e| e.stream == s) && grouped[0][0].stream == other, "{name}");
        backend.finish().await;
    }
}

#[tokio::test]
async fn one_stream_under_contention_has_one_winner_per_version() {
    for backend in backends("one_stream_under_contention_has_one_winner_per_version").await {
        let (name, store) = (backend.name, backend.store.clone());
        let s = StreamId::new("t", "hot");
        appended(store.append(append(&s, ExpectedVersion::NoStream, &["Init"])).await);
        // 10 rounds; in each, 20 writers race for the same next version.
        for round in 1..=10u64 {
            let attempts = (0..20).map(|_| store.append(append(&s, ExpectedVersion::Exact(round), &["Race"])));
            let results = join_all(attempts).await;
            let winners = results.iter().filter(|r| r.is_ok()).count();
            assert_eq!(winners, 1, "{name}: round {round}");
            assert!(results.iter().all(|r| matches!(r, Ok(_) | Err(StoreError::Conflict { .. }))));
        }
        let versions: Vec<u64> =
            store.read_stream(&s, StreamRange::all()).await.unwrap().iter().map(|e| e.version).collect();
        assert_eq!(versions, (1..=11).collect::<Vec<_>>(), "{name}");
        backend.finish().await;
    }
}

#[tokio::test]
async fn concurrent_appends_to_many_streams_keep_the_global_log_gap_free() {
    for backend in backends("concurrent_appends_to_many_streams_keep_the_global_log_gap_free").await {
        let (name, store) = (backend.name, backend.store.clone());
        let writers = (0..50).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let s = StreamId::new("t", format!("s{i}"));
                for _ in 0..10 {
                    appended(store.append(append(&s, ExpectedVersion::Any, &["X", "Y"])).await);
                }
            })
        });
        for writer in join_all(writers).await {
            writer.unwrap();
        }
        let all = store.read_all(0, 10_000).await.unwrap();
        assert_eq!(all.iter().map(|e| e.position).collect::<Vec<_>>(), (1..=1000).collect::<Vec<_>>(), "{name}");
        let page = store.read_all(990, 5).await.unwrap();
        assert_eq!(page.iter().map(|e| e.position).collect::<Vec<_>>(), [991, 992, 993, 994, 995]);
        for i in 0..50 {
            let stream = store.read_stream(&StreamId::new("t", format!("s{i}")), StreamRange::all()).await.unwrap();
            assert_eq!(stream.iter().map(|e| e.version).collect::<Vec<_>>(), (1..=20).collect::<Vec<_>>());
            assert!(stream.windows(2).all(|w| w[0].position < w[1].position), "stream order follows global order");
        }
        backend.finish().await;
    }
}

#[tokio::test]
async fn payload_limit_and_unicode() {
    for backend in backends("payload_limit_and_unicode").await {
        let (name, store) = (backend.name, backend.store.clone());
        let s = StreamId::new("tipo-ñ", "聚合-🦀");
        let mut at_limit = append(&s, ExpectedVersion::Any, &[]);
        let filler = "é".repeat((LIMIT - 20) / 2);
        let body = format!(r#"{{"text":"{filler}"}}"#);
        assert!(body.len() <= LIMIT);
        at_limit.events.push(EventData { event_type: "Größe".into(), schema_version: 1, data: body.clone() });
        let stored = appended(store.append(at_limit).await);
        assert_eq!(stored[0].data, body, "{name}");
        let mut over = append(&s, ExpectedVersion::Any, &[]);
        over.events.push(EventData { event_type: "Big".into(), schema_version: 1, data: "x".repeat(LIMIT + 1) });
        assert!(matches!(store.append(over).await, Err(StoreError::PayloadTooLarge { .. })), "{name}");
        let read = store.read_stream(&s, StreamRange::all()).await.unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(
            (read[0].stream.aggregate_type.as_str(), read[0].stream.aggregate_id.as_str()),
            ("tipo-ñ", "聚合-🦀")
        );
        assert_eq!(read[0].event_type, "Größe");
        assert_eq!(read[0], stored[0], "{name}: read back exactly as stored");
        backend.finish().await;
    }
}
