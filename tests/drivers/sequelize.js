// Sequelize on node-pg, pointed at signalbox with no `replication` option at
// all, compared with the same model read directly from the primary.
// Env: SB_URL (signalbox), DIRECT_URL (primary), REPLICA_PORTS (comma list).
'use strict';
const { Sequelize, DataTypes, QueryTypes } = require('sequelize');

function model(sequelize) {
  return sequelize.define('Order', {
    status: { type: DataTypes.ENUM('new', 'paid', 'shipped'), allowNull: false },
    meta: { type: DataTypes.JSONB },
    tags: { type: DataTypes.ARRAY(DataTypes.INTEGER) },
    placedAt: { type: DataTypes.DATE },
    total: { type: DataTypes.DECIMAL(10, 2) },
  }, { tableName: 'sequelize_orders' });
}

async function main() {
  const replicas = process.env.REPLICA_PORTS.split(',').map(Number);
  const sb = new Sequelize(process.env.SB_URL, { logging: false });
  const direct = new Sequelize(process.env.DIRECT_URL, { logging: false });
  const Order = model(sb);
  const DirectOrder = model(direct);
  await sb.sync({ force: true });
  const placed = new Date('2024-02-29T12:34:56.789Z');
  for (let i = 1; i <= 3; i++) {
    await Order.create({ status: 'new', meta: { n: i, nested: { ok: true } }, tags: [i, i * 10], placedAt: placed, total: `${i}9.95` });
  }
  // Managed transaction: everything inside runs on the primary.
  await sb.transaction(async (t) => {
    const o = await Order.findByPk(2, { transaction: t });
    o.status = 'shipped';
    o.meta = { ...o.meta, carrier: 'dhl' };
    await o.save({ transaction: t });
  });
  // Reads go to replicas, which may be a moment behind — right after
  // sync({ force: true }) a replica may not have the new table (42P01) or
  // enum type yet: wait (bounded), and fail with the last error if it lasts.
  let rows = [];
  let lastError = null;
  for (let i = 0; i < 100; i++) {
    try {
      rows = await Order.findAll({ order: [['id', 'ASC']], raw: true });
      lastError = null;
    } catch (e) {
      const code = e.parent && e.parent.code;
      if (code !== '42P01' && code !== '42704') throw e;
      lastError = e;
    }
    if (rows.length === 3 && rows[1].status === 'shipped') break;
    await new Promise((r) => setTimeout(r, 50));
  }
  if (lastError) throw lastError;
  const directRows = await DirectOrder.findAll({ order: [['id', 'ASC']], raw: true });
  const [where] = await sb.query('SELECT inet_server_port() AS port, pg_is_in_recovery() AS replica', { type: QueryTypes.SELECT });
  const raw = await sb.query('SELECT count(*)::int AS n FROM sequelize_orders WHERE status = :s', { replacements: { s: 'shipped' }, type: QueryTypes.SELECT });
  const result = {
    same: JSON.stringify(rows) === JSON.stringify(directRows),
    rows: rows.length,
    readOnReplica: where.replica === true && replicas.includes(where.port),
    rawShipped: raw[0].n,
    sample: rows[1],
  };
  console.log(JSON.stringify(result));
  await sb.close();
  await direct.close();
  if (!result.same) {
    console.error('through signalbox:', JSON.stringify(rows));
    console.error('direct:          ', JSON.stringify(directRows));
    process.exit(1);
  }
}

main().catch((e) => { console.error(e); process.exit(2); });
