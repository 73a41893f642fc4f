//! Classification costs: a statement classified from scratch (parse + the
//! fail-closed walk), the same parse with pg_query's own node list (what
//! the classifier used before the walk), a cache hit, and the catalog's
//! judgement of a classified statement with warm facts.
//! Run: `cargo bench -p signalbox --bench classify`. Results: bench/RESULTS.md.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use signalbox::catalog::{DbCatalog, Rows};
use signalbox::sql::classify::{classify, Classifier};

const STATEMENTS: &[(&str, &str)] = &[
    ("point", "SELECT id, name, email FROM users WHERE id = $1"),
    (
        "orm",
        "SELECT \"Order\".\"id\", \"Order\".\"status\", \"Order\".\"total\", \"Order\".\"createdAt\", \
         \"customer\".\"id\" AS \"customer.id\", \"customer\".\"name\" AS \"customer.name\", \
         \"items\".\"sku\" AS \"items.sku\", \"items\".\"qty\" AS \"items.qty\" \
         FROM \"orders\" AS \"Order\" LEFT OUTER JOIN \"customers\" AS \"customer\" \
         ON \"Order\".\"customerId\" = \"customer\".\"id\" LEFT OUTER JOIN \"order_items\" AS \"items\" \
         ON \"Order\".\"id\" = \"items\".\"orderId\" WHERE \"Order\".\"status\" IN ('paid', 'shipped') \
         AND \"Order\".\"createdAt\" > now() - interval '7 days' ORDER BY \"Order\".\"createdAt\" DESC LIMIT 50",
    ),
    (
        "report",
        "WITH recent AS (SELECT customer_id, sum(total) AS spent, count(*) FILTER (WHERE status = 'paid') AS paid \
         FROM orders WHERE created_at > now() - interval '30 days' GROUP BY customer_id) \
         SELECT c.name, r.spent, r.paid, rank() OVER (ORDER BY r.spent DESC) \
         FROM recent r JOIN customers c ON c.id = r.customer_id \
         WHERE coalesce(r.spent, 0) > 100 ORDER BY 4 LIMIT 20",
    ),
];

fn s(v: &str) -> String {
    v.to_owned()
}

/// A catalog the size of a real database's: PostgreSQL's ~3000 built-in
/// functions, a few hundred tables and views.
fn catalog() -> DbCatalog {
    let mut rows = Rows::default();
    for i in 0..3000 {
        rows.functions.push((
            s("pg_catalog"),
            format!("builtin_{i}"),
            s("i"),
            s("internal"),
            None,
        ));
    }
    for f in ["now", "sum", "count", "rank", "coalesce", "lower"] {
        rows.functions
            .push((s("pg_catalog"), s(f), s("s"), s("internal"), None));
    }
    for i in 0..300 {
        rows.relations
            .push((s("public"), format!("table_{i}"), s("p"), s("r"), None));
    }
    for t in ["users", "orders", "customers", "order_items"] {
        rows.relations
            .push((s("public"), s(t), s("p"), s("r"), None));
    }
    DbCatalog::build(&rows, &[])
}

fn classification(c: &mut Criterion) {
    let cat = catalog();
    for (name, sql) in STATEMENTS {
        c.bench_function(&format!("classify uncached ({name})"), |b| {
            b.iter(|| black_box(classify(black_box(sql))))
        });
        c.bench_function(&format!("pg_query parse + its node list ({name})"), |b| {
            b.iter(|| {
                let p = pg_query::parse(black_box(sql), pg_query::ParserOptions::DEFAULT).unwrap();
                black_box((p.functions(), p.tables(), p.protobuf.nodes().len()))
            })
        });
        let cached = Classifier::default();
        cached.classify(sql);
        c.bench_function(&format!("classify cached ({name})"), |b| {
            b.iter(|| black_box(cached.classify(black_box(sql))))
        });
        let facts = classify(sql).facts;
        c.bench_function(&format!("catalog judge, warm ({name})"), |b| {
            b.iter(|| black_box(cat.judge(black_box(&facts))))
        });
    }
}

criterion_group!(benches, classification);
criterion_main!(benches);
