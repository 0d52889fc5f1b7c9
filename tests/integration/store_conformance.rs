//! The event store contract, written once against the `EventStore` trait and
//! run on every backend: SQLite always, PostgreSQL when `DATABASE_URL` is set.

use std::sync::Arc;

use futures::future::join_all;
use orchestrix_host::metrics::Metrics;
use orchestrix_host::store::{
    AppendOutcome, AppendRequest, CopyId, CopyRole, DocumentKey, DocumentOp, DocumentQuery, EventData, EventMetadata,
    EventStore, ExpectedVersion, PostgresStore, ReadModelChange, Snapshot, SnapshotLookup, SqliteStore, StoreError,
    StoreOptions, StoredEvent, StreamId, StreamRange,
};
use orchestrix_host::telemetry::TraceContext;
use orchestrix_testkit::{Purpose, drop_schema, fresh_schema};

use crate::support::database_url;

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
        url: String,
    },
    Schema {
        url: String,
        schema: String,
    },
}

impl Backend {
    /// Run SQL on the backend's database over a connection of its own, as
    /// an operator or another process would.
    pub async fn execute_outside(&self, sql: &str) {
        use sqlx::{Connection, Executor};
        match &self.storage {
            Storage::Directory { url, .. } => {
                let mut connection = sqlx::SqliteConnection::connect(url).await.expect("open the SQLite file");
                connection.execute(sqlx::AssertSqlSafe(sql.to_owned())).await.expect("SQL runs on SQLite");
            }
            Storage::Schema { url, schema } => {
                let mut connection = sqlx::PgConnection::connect(url).await.expect("connect to PostgreSQL");
                let sql = format!("SET search_path TO \"{schema}\"; {sql}");
                connection.execute(sqlx::AssertSqlSafe(sql)).await.expect("SQL runs on PostgreSQL");
            }
        }
    }

    /// A second store on the same storage, opened with `options` (as a
    /// restarted host would open it).
    pub async fn reopen(&self, options: StoreOptions) -> Arc<dyn EventStore> {
        match &self.storage {
            Storage::Directory { url, .. } => {
                Arc::new(SqliteStore::open(url, &options, Metrics::new()).await.expect("sqlite opens again"))
            }
            Storage::Schema { url, schema } => {
                let options = StoreOptions { schema: Some(schema.clone()), ..options };
                Arc::new(PostgresStore::open(url, &options, Metrics::new()).await.expect("PostgreSQL opens again"))
            }
        }
    }

    /// Close the store and remove its storage.
    pub async fn finish(self) {
        self.store.close().await;
        if let Storage::Schema { url, schema } = self.storage {
            drop_schema(&url, &schema).await.expect("the test schema is dropped");
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
        vec![Backend { name: "sqlite", store: Arc::new(sqlite), storage: Storage::Directory { _dir: dir, url } }];
    if let Some(url) = database_url(test) {
        let schema = fresh_schema(&url, Purpose::Test).await.expect("a fresh schema");
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
        // Read together, every field is what a single stream's read gives,
        // text with escapes and non-ASCII characters and absent ids included.
        let mut odd = append(&other, ExpectedVersion::Any, &["Y"]);
        odd.events[0].data = r#"{"text":"quote \" backslash \\ tab \t é 😀 \u0001"}"#.into();
        odd.metadata.correlation_id = Some("c-1".into());
        odd.metadata.trace = TraceContext::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("vendor=opaque,other=x"),
        );
        let written = appended(store.append(odd.clone()).await);
        assert_eq!(written[0].trace, odd.metadata.trace, "{name}");
        let together = store.read_streams(&[s.clone(), other.clone()]).await.unwrap();
        for (events, stream) in together.iter().zip([&s, &other]) {
            assert_eq!(events, &store.read_stream(stream, StreamRange::all()).await.unwrap(), "{name}: {stream}");
        }
        assert!(together[1][1].data.contains('😀') && together[1][0].correlation_id.is_none(), "{name}");
        // The trace context comes back as it went in, and its absence too.
        assert_eq!(together[1][1].trace, odd.metadata.trace, "{name}");
        assert_eq!(together[1][0].trace, None, "{name}");
        let logged = store.read_all(together[1][1].position - 1, 1).await.unwrap();
        assert_eq!(logged[0].trace, odd.metadata.trace, "{name}: the global log");
        backend.finish().await;
    }
}

#[tokio::test]
async fn snapshots_are_found_by_code_and_version_and_stream_versions_by_time() {
    for backend in backends("snapshots_are_found_by_code_and_version").await {
        let (name, store) = (backend.name, backend.store.clone());
        let s = StreamId::new("t", "snap");
        let first = appended(store.append(append(&s, ExpectedVersion::Any, &["A", "B"])).await);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        appended(store.append(append(&s, ExpectedVersion::Any, &["C", "D", "E"])).await);
        let at = |time| store.stream_version_at(&s, time);
        assert_eq!(at(first[1].time).await.unwrap(), Some(2), "{name}");
        assert_eq!(at(first[0].time - std::time::Duration::from_secs(1)).await.unwrap(), None, "{name}");
        assert_eq!(at(first[0].time + std::time::Duration::from_secs(3600)).await.unwrap(), Some(5), "{name}");

        let snapshot = |key: &str, version: u64| Snapshot {
            stream: s.clone(),
            state_key: key.to_owned(),
            version,
            state: format!("{key}@{version}").into_bytes(),
        };
        let find = |key: &'static str, at_most: u64| {
            let store = store.clone();
            let s = s.clone();
            async move {
                match store.load_snapshot(&s, key, at_most).await.unwrap() {
                    SnapshotLookup::Found { version, state } => {
                        format!("{version}:{}", String::from_utf8(state).unwrap())
                    }
                    SnapshotLookup::OtherCode => "other".into(),
                    SnapshotLookup::None => "none".into(),
                }
            }
        };
        assert_eq!(find("v1", u64::MAX).await, "none", "{name}");
        store.save_snapshots(vec![snapshot("v1", 2), snapshot("v1", 4), snapshot("v2", 5)]).await.unwrap();
        // The first write of a (stream, key, version) stands.
        store.save_snapshots(vec![Snapshot { state: b"later".to_vec(), ..snapshot("v1", 4) }]).await.unwrap();
        assert_eq!(find("v1", u64::MAX).await, "4:v1@4", "{name}");
        assert_eq!(find("v1", 3).await, "2:v1@2", "{name}: the nearest at or below");
        assert_eq!(find("v1", 1).await, "none", "{name}: nothing at or below version 1");
        assert_eq!(find("v2", u64::MAX).await, "5:v2@5", "{name}");
        assert_eq!(find("v3", u64::MAX).await, "other", "{name}: v3 has none; v1's and v2's are not its own");
        let ids = store.stream_ids("t", None, 10).await.unwrap();
        assert_eq!(ids, std::slice::from_ref(&s), "{name}");
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

fn upsert(collection: &str, key: &str, body: &str) -> DocumentOp {
    DocumentOp::Upsert(DocumentKey::new(collection, key), body.to_owned())
}

fn page_query(projection: &str, collection: &str, filters: &[(&str, &str)], after: Option<&str>) -> DocumentQuery {
    DocumentQuery {
        projection: projection.into(),
        collection: collection.into(),
        filters: filters
            .iter()
            .map(|(field, value)| ((*field).to_owned(), orchestrix_host::store::read_models::filter_candidates(value)))
            .collect(),
        after: after.map(str::to_owned),
        limit: 2,
    }
}

#[tokio::test]
async fn read_model_changes_are_atomic_and_checkpointed_exactly_once() {
    for backend in backends("read_model_changes_are_atomic_and_checkpointed_exactly_once").await {
        let (name, store) = (backend.name, backend.store.clone());
        let create =
            |role| ReadModelChange::CreateCopy { projection: "p".into(), module: "m".into(), version: 1, role };
        let first = store.change_read_model(create(CopyRole::Active)).await.expect("first copy");
        assert!(
            matches!(store.change_read_model(create(CopyRole::Active)).await, Err(StoreError::ReadModelConflict(_))),
            "{name}: one active copy per projection"
        );
        let copy = CopyId { projection: "p".into(), generation: first };
        let commit = |from, to, ops| ReadModelChange::Commit {
            copy: copy.clone(),
            from,
            to,
            ops,
            collections: Some(vec!["c".into()]),
            skipped: 0,
            fence: None,
        };
        let ops = vec![
            upsert("c", "a", r#"{"n":1,"s":"x"}"#),
            upsert("c", "b", r#"{"n":2,"s":"y"}"#),
            upsert("c", "a", r#"{"n":3,"s":"x"}"#),
            upsert("c", "gone", r#"{"n":0}"#),
            DocumentOp::Delete(DocumentKey::new("c", "gone")),
            upsert("c", "d", r#"{"n":3,"s":"3"}"#),
        ];
        store.change_read_model(commit(0, 5, ops)).await.expect("commit");
        // A second commit from the old checkpoint (a runner that lost a race) writes nothing.
        let stale = commit(0, 9, vec![upsert("c", "a", r#"{"n":99}"#)]);
        assert!(matches!(store.change_read_model(stale).await, Err(StoreError::ReadModelConflict(_))), "{name}");
        let looked = store.lookup_document("p", &DocumentKey::new("c", "a")).await.unwrap().expect("active copy");
        assert_eq!((looked.position, looked.generation), (5, first), "{name}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&looked.body.unwrap()).unwrap()["n"], 3, "{name}");
        assert!(store.lookup_document("p", &DocumentKey::new("c", "gone")).await.unwrap().unwrap().body.is_none());
        assert!(store.lookup_document("nope", &DocumentKey::new("c", "a")).await.unwrap().is_none(), "{name}");
        let copies = store.projection_copies().await.unwrap();
        assert_eq!((copies[0].position, copies[0].collections.clone()), (5, vec!["c".to_owned()]), "{name}");

        // Pages in key order, equality filters on JSON values (string or literal).
        let page = store.list_documents(&page_query("p", "c", &[], None)).await.unwrap().unwrap();
        let keys: Vec<&str> = page.documents.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!((keys, page.more), (vec!["a", "b"], true), "{name}");
        let rest = store.list_documents(&page_query("p", "c", &[], Some("b"))).await.unwrap().unwrap();
        assert_eq!((rest.documents.len(), rest.more), (1, false), "{name}");
        let filtered = store.list_documents(&page_query("p", "c", &[("n", "3")], None)).await.unwrap().unwrap();
        assert_eq!(filtered.documents.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["a", "d"], "{name}");
        let by_text = store.list_documents(&page_query("p", "c", &[("s", "3")], None)).await.unwrap().unwrap();
        assert_eq!(by_text.documents.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["d"], "{name}");
        let both = page_query("p", "c", &[("n", "3"), ("s", "x")], None);
        assert_eq!(store.list_documents(&both).await.unwrap().unwrap().documents.len(), 1, "{name}");

        // A shadow copy is invisible until activated; then the old one retires and drops.
        let shadow = store.change_read_model(create(CopyRole::Building)).await.expect("shadow");
        let shadow_copy = CopyId { projection: "p".into(), generation: shadow };
        let shadow_commit = ReadModelChange::Commit {
            copy: shadow_copy.clone(),
            from: 0,
            to: 7,
            ops: vec![upsert("c", "z", r#"{"n":7}"#)],
            collections: None,
            skipped: 0,
            fence: None,
        };
        store.change_read_model(shadow_commit).await.expect("shadow commit");
        assert_eq!(store.list_documents(&page_query("p", "c", &[], None)).await.unwrap().unwrap().generation, first);
        store.change_read_model(ReadModelChange::Activate { copy: shadow_copy.clone() }).await.expect("activate");
        let switched = store.list_documents(&page_query("p", "c", &[], None)).await.unwrap().unwrap();
        assert_eq!((switched.generation, switched.position, switched.documents.len()), (shadow, 7, 1), "{name}");
        assert!(
            matches!(store.change_read_model(commit(5, 6, Vec::new())).await, Err(StoreError::ReadModelConflict(_))),
            "{name}: a retired copy takes no commits"
        );
        let dropped =
            store.change_read_model(ReadModelChange::DropRetired { copy: copy.clone(), limit: 2 }).await.unwrap();
        assert_eq!(dropped, 2, "{name}");
        store.change_read_model(ReadModelChange::DropRetired { copy: copy.clone(), limit: 2 }).await.unwrap();
        let left: Vec<u64> = store.projection_copies().await.unwrap().iter().map(|c| c.id.generation).collect();
        assert_eq!(left, [shadow], "{name}: the retired copy is gone once empty");
        backend.finish().await;
    }
}

/// A trigger that refuses any event whose payload holds `refuse-me`, the
/// way a database refuses one row of a batch (a constraint, a size limit,
/// an encoding): SQLite answers `SQLITE_CONSTRAINT`, PostgreSQL SQLSTATE
/// 23514 (check_violation).
const REFUSING_TRIGGER: [&str; 2] = [
    "CREATE TRIGGER refuse_marked BEFORE INSERT ON events WHEN NEW.data LIKE '%refuse-me%' \
     BEGIN SELECT RAISE(ABORT, 'marked event refused'); END",
    "CREATE FUNCTION refuse_marked() RETURNS trigger AS $$ BEGIN \
       IF NEW.data LIKE '%refuse-me%' THEN RAISE EXCEPTION 'marked event refused' USING ERRCODE = '23514'; END IF; \
       RETURN NEW; END $$ LANGUAGE plpgsql; \
     CREATE TRIGGER refuse_marked BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION refuse_marked()",
];

#[tokio::test]
async fn a_refused_group_commit_fails_only_its_culprit() {
    for backend in backends("a_refused_group_commit_fails_only_its_culprit").await {
        let (name, store) = (backend.name, backend.store.clone());
        backend.execute_outside(REFUSING_TRIGGER[usize::from(name == "postgres")]).await;
        for round in 0..3 {
            // 64 appends in flight at once, so they share group commits; one
            // of them carries what the database refuses.
            let appends = (0..64).map(|i| {
                let store = store.clone();
                let mut request =
                    append(&StreamId::new("t", format!("r{round}-{i}")), ExpectedVersion::NoStream, &["A"]);
                if i == 17 {
                    request.events[0].data = r#"{"note":"refuse-me"}"#.into();
                }
                async move { store.append(request).await }
            });
            let outcomes = join_all(appends).await;
            for (i, outcome) in outcomes.into_iter().enumerate() {
                match (i, outcome) {
                    (17, Err(StoreError::Refused(reason))) => {
                        assert!(reason.contains("marked event refused"), "{name}: {reason}")
                    }
                    (17, other) => panic!("{name}: the culprit must be refused, got {other:?}"),
                    (_, outcome) => assert_eq!(appended(outcome).len(), 1, "{name}: append {i} of round {round}"),
                }
            }
        }
        let log = store.read_all(0, 1000).await.unwrap();
        assert_eq!(log.len(), 3 * 63, "{name}: every valid append committed");
        assert!(log.iter().enumerate().all(|(i, e)| e.position == i as u64 + 1), "{name}: gap-free positions");
        assert_eq!(store.write_failure(), None, "{name}: a refusal is not a failing store");
        backend.finish().await;
    }
}
