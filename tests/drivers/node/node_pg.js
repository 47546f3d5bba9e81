// node-postgres (pg) in its default settings, with named queries
// ({name, text, values}: a named prepared statement from the first use on a
// connection). It does not pipeline by default: queries issued without
// waiting are queued by the client and sent one after the other. COPY through
// pg-copy-streams, its companion package. No public cancel API.
'use strict'

const { Readable } = require('stream')
const { pipeline } = require('stream/promises')
const pg = require('pg')
const copyStreams = require('pg-copy-streams')
const h = require('./harness')

async function connect(s, leak = false) {
  const client = new pg.Client({
    host: s.host,
    port: leak ? s.leakPort : s.port,
    database: s.database,
    user: s.user,
    password: s.password,
    ssl: { ca: s.ca },
    connectionTimeoutMillis: 10000,
  })
  await client.connect()
  return client
}

async function recreate(client, table, columns) {
  await client.query(`DROP TABLE IF EXISTS ${table}`)
  await client.query(`CREATE TABLE ${table} (${columns})`)
}

async function count(client, table) {
  const r = await client.query(`SELECT count(*)::int AS n FROM ${table}`)
  return r.rows[0].n
}

const echo = (i, name = 'echo') => ({ name, text: 'SELECT $1::int AS v', values: [i] })

async function many(s) {
  const t = s.table('many')
  const setup = await connect(s)
  await recreate(setup, t, 'client int, i int, v int')
  await setup.end()
  const client = async c => {
    const conn = await connect(s)
    try {
      for (let i = 0; i < s.repeat; i++) {
        await conn.query('BEGIN')
        const r = await conn.query({ name: 'many-plus-one', text: 'SELECT $1::int + 1 AS v', values: [i] })
        const v = r.rows[0].v
        h.check(v === i + 1, `client ${c} got ${v}`)
        await conn.query({ name: 'many-insert', text: `INSERT INTO ${t} VALUES ($1, $2, $3)`, values: [c, i, v] })
        await conn.query('COMMIT')
      }
    } finally {
      await conn.end()
    }
  }
  await Promise.all(Array.from({ length: s.clients }, (_, c) => client(c)))
  const conn = await connect(s)
  try {
    const n = await count(conn, t)
    h.check(n === s.clients * s.repeat, `count ${n}`)
  } finally {
    await conn.end()
  }
}

async function pipelineScenario(s) {
  const conn = await connect(s)
  try {
    // Issued without waiting: named, unnamed (with and without parameters),
    // a named statement that fails, and more after it.
    const queries = [
      conn.query(echo(1)),
      conn.query('SELECT $1::int AS v', [2]),
      conn.query('SELECT 3 AS v'),
      conn.query({ name: 'divide', text: 'SELECT 1 / $1::int AS v', values: [0] }),
      conn.query(echo(5)),
      conn.query({ name: 'twice', text: 'SELECT $1::int * 2 AS v', values: [3] }),
    ]
    const settled = await Promise.allSettled(queries)
    const got = settled.map(r => (r.status === 'fulfilled' ? r.value.rows[0].v : r.reason.code))
    h.check(JSON.stringify(got) === JSON.stringify([1, 2, 3, '22012', 5, 6]), `got ${JSON.stringify(got)}`)
    for (let i = 0; i < s.repeat; i++) {
      const r = await conn.query(echo(i))
      h.check(r.rows[0].v === i, 'echo after the error')
    }
  } finally {
    await conn.end()
  }
}

async function copy(s) {
  const t = s.table('copy')
  const data = h.copyRows()
  const conn = await connect(s)
  try {
    await recreate(conn, t, 'id int PRIMARY KEY, t text')
    await pipeline(Readable.from([data]), conn.query(copyStreams.from(`COPY ${t} (id, t) FROM STDIN`)))
    const chunks = []
    const out = conn.query(copyStreams.to(`COPY (SELECT id, t FROM ${t} ORDER BY id) TO STDOUT`))
    for await (const chunk of out) chunks.push(chunk)
    h.check(Buffer.concat(chunks).toString() === data, 'COPY TO gave back something else')
    h.check((await count(conn, t)) === 1000, 'count after COPY')
  } finally {
    await conn.end()
  }
}

async function failedTx(s) {
  const t = s.table('tx')
  const conn = await connect(s)
  try {
    await recreate(conn, t, 'id int PRIMARY KEY')
    const insert = { name: 'tx-insert', text: `INSERT INTO ${t} VALUES ($1)`, values: [1] }
    await conn.query('BEGIN')
    await conn.query(insert)
    await h.expectError('23505', () => conn.query(insert), 'duplicate')
    await h.expectError('25P02', () => conn.query(echo(1)), 'a statement after the error')
    await conn.query('ROLLBACK')
    for (let i = 0; i < s.repeat; i++) {
      h.check((await conn.query(echo(i))).rows[0].v === i, 'echo after rollback')
    }
    h.check((await count(conn, t)) === 0, "the failed transaction's row")
  } finally {
    await conn.end()
  }
}

async function listen(s) {
  const channel = s.table('chan')
  const listener = await connect(s)
  const notifier = await connect(s)
  try {
    const inbox = new h.Inbox()
    listener.on('notification', msg => inbox.push([msg.channel, msg.payload]))
    await listener.query(`LISTEN ${channel}`)
    for (const payload of h.NOTIFY_PAYLOADS) {
      await h.sleep(300) // the listener is idle, between transactions
      await notifier.query('SELECT pg_notify($1, $2)', [channel, payload])
      h.expectNotifications(await inbox.next(5000), channel, payload)
    }
    h.check((await listener.query('SELECT 1 AS v')).rows[0].v === 1, 'SELECT 1 on the listener')
  } finally {
    await listener.end()
    await notifier.end()
  }
}

async function leak(s) {
  const a = await connect(s, true)
  try {
    await a.query("SET app.tenant_id = 'A'")
    await a.query('CREATE TEMP TABLE leak_tmp (secret text)')
    await a.query("INSERT INTO leak_tmp VALUES ('A')")
    await a.query({ name: 'lock', text: 'SELECT pg_advisory_lock($1)', values: [s.lockKey] })
    await a.query("SET statement_timeout = '1ms'")
  } finally {
    await a.end()
  }
  const b = await connect(s, true)
  try {
    await h.clientB(async () => (await b.query(h.LEAK_CHECK)).rows[0])
  } finally {
    await b.end()
  }
}

h.main({ many, pipeline: pipelineScenario, copy, failed_tx: failedTx, listen, leak })
