// node-pg through signalbox, where protocol details decide whether an
// application keeps working. Prints one JSON object.
//  - A cursor streaming in pieces (Execute + Flush, no Sync) that fails
//    mid-stream, then more work on the same connection.
//  - A pooled client whose server connection is terminated while it sits
//    idle: the pool must see the error, discard the client and hand out a
//    working one.
// Env: SB_URL (transaction pooling), SB_SESSION_URL (session pooling),
// DIRECT_URL (the primary, to terminate backends from outside).
const { Client, Pool } = require('pg');
const Cursor = require('pg-cursor');

function withTimeout(promise, ms, what) {
  let timer;
  const limit = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
  });
  return Promise.race([promise, limit]).finally(() => clearTimeout(timer));
}

async function failingCursor(url) {
  const client = new Client({ connectionString: url });
  await client.connect();
  const out = { rows: 0, error: null };
  for (let round = 0; round < 3; round++) {
    const cursor = client.query(
      new Cursor('SELECT 100 / (45 - g) AS v FROM generate_series(1, 100) g')
    );
    try {
      for (;;) {
        const batch = await withTimeout(cursor.read(10), 10000, 'cursor read');
        if (batch.length === 0) break;
        out.rows += batch.length;
      }
    } catch (e) {
      out.error = e.code || e.message;
    }
    await withTimeout(cursor.close(), 10000, 'cursor close');
  }
  // The same connection goes on: a query, and a cursor that completes.
  const after = await withTimeout(client.query("SELECT 'after' AS v"), 10000, 'query after');
  out.after = after.rows[0].v;
  const ok = client.query(new Cursor('SELECT g FROM generate_series(1, 25) g'));
  let streamed = 0;
  for (;;) {
    const batch = await withTimeout(ok.read(10), 10000, 'second cursor');
    if (batch.length === 0) break;
    streamed += batch.length;
  }
  await ok.close();
  out.streamed = streamed;
  await client.end();
  return out;
}

async function terminatedWhileIdle(sessionUrl, directUrl) {
  const pool = new Pool({ connectionString: sessionUrl, max: 1 });
  const errors = [];
  pool.on('error', (e) => errors.push(e.code || e.message));
  const first = (await pool.query('SELECT pg_backend_pid() AS pid')).rows[0].pid;
  const direct = new Client({ connectionString: directUrl });
  await direct.connect();
  await direct.query('SELECT pg_terminate_backend($1)', [first]);
  await direct.end();
  // The idle pooled client learns at once (as with PostgreSQL itself).
  for (let i = 0; i < 100 && errors.length === 0; i++) {
    await new Promise((r) => setTimeout(r, 50));
  }
  const second = (await withTimeout(pool.query('SELECT pg_backend_pid() AS pid'), 10000, 'pool query'))
    .rows[0].pid;
  await pool.end();
  return { errors, first, second };
}

(async () => {
  const cursor = await failingCursor(process.env.SB_URL);
  const pool = await terminatedWhileIdle(process.env.SB_SESSION_URL, process.env.DIRECT_URL);
  console.log(JSON.stringify({ cursor, pool }));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
