// An application written for one PostgreSQL, unchanged, through signalbox
// with read-your-writes on: create a row and read it back at once, update it
// in a managed transaction and read it again — on Sequelize's own pool, so
// the read usually runs on another connection than the write. No retries:
// a read that misses a write counts as stale.
// Env: SB_URL (signalbox), ITERATIONS. Prints one JSON line.
'use strict';
const { Sequelize, DataTypes } = require('sequelize');

async function main() {
  const iterations = Number(process.env.ITERATIONS || 200);
  const sb = new Sequelize(process.env.SB_URL, {
    logging: false,
    pool: { max: 5, min: 5 },
  });
  const Account = sb.define('Account', {
    owner: { type: DataTypes.TEXT, allowNull: false },
    balance: { type: DataTypes.INTEGER, allowNull: false },
  }, { tableName: 'sequelize_accounts' });
  await sb.sync({ force: true });
  // A read that fails because the table is not there yet is stale too.
  const read = async (f) => {
    try {
      return await f();
    } catch (e) {
      const code = e.parent && e.parent.code;
      if (code === '42P01') return null;
      throw e;
    }
  };
  let reads = 0;
  let stale = 0;
  const misses = [];
  for (let i = 0; i < iterations; i++) {
    const created = await Account.create({ owner: `owner-${i}`, balance: i });
    const fresh = await read(() => Account.findByPk(created.id));
    reads++;
    if (!fresh || fresh.balance !== i) {
      stale++;
      misses.push(`create ${i}`);
    }
    await sb.transaction(async (t) => {
      const a = await Account.findByPk(created.id, { transaction: t, lock: t.LOCK.UPDATE });
      a.balance += 1000;
      await a.save({ transaction: t });
    });
    const updated = await read(() => Account.findByPk(created.id));
    reads++;
    if (!updated || updated.balance !== i + 1000) {
      stale++;
      misses.push(`update ${i}`);
    }
    const count = await read(() => Account.count({ where: { owner: `owner-${i}` } }));
    reads++;
    if (count !== 1) {
      stale++;
      misses.push(`count ${i}`);
    }
  }
  console.log(JSON.stringify({ iterations, reads, stale, misses: misses.slice(0, 10) }));
  await sb.close();
}

main().catch((e) => { console.error(e); process.exit(2); });
