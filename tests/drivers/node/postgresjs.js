// postgres.js (postgres) in its default settings: prepare: true, so every
// tagged-template query is a named prepared statement; queries issued
// without waiting on one connection are pipelined; query.cancel() sends a
// CancelRequest; sql.listen() keeps a connection of its own for LISTEN.
'use strict'

const { finished } = require('stream/promises')
const postgres = require('postgres')
const h = require('./harness')

function connect(s, options = {}) {
  const { leak, ...rest } = options
  return postgres({
    host: s.host,
    port: leak ? s.leakPort : s.port,
    database: s.database,
    username: s.user,
    password: s.password,
    ssl: { ca: s.ca },
    connect_timeout: 10,
    ...rest,
  })
}

class Rollback extends Error {}

async function many(s) {
  const t = s.table('many')
  const sql = connect(s)
  try {
    await sql`DROP TABLE IF EXISTS ${sql(t)}`
    await sql`CREATE TABLE ${sql(t)} (client int, i int, v int)`
    const client = async c => {
      for (let i = 0; i < s.repeat; i++) {
        await sql.begin(async tx => {
          const [{ v }] = await tx`SELECT ${i}::int + 1 AS v`
          h.check(v === i + 1, `client ${c} got ${v}`)
          await tx`INSERT INTO ${sql(t)} VALUES (${c}, ${i}, ${v})`
        })
      }
    }
    await Promise.all(Array.from({ length: s.clients }, (_, c) => client(c)))
    const [{ n }] = await sql`SELECT count(*)::int AS n FROM ${sql(t)}`
    h.check(n === s.clients * s.repeat, `count ${n}`)
  } finally {
    await sql.end()
  }
}

async function pipeline(s) {
  const sql = connect(s, { max: 1 })
  try {
    // One connection, queries issued without waiting: pipelined. Named
    // (tagged templates), unnamed (unsafe), a failing one in the middle.
    const queries = [
      sql`SELECT ${1}::int AS v`,
      sql.unsafe('SELECT $1::int AS v', [2]),
      sql.unsafe('SELECT 3 AS v'),
      sql`SELECT 1 / ${0}::int AS v`,
      sql`SELECT ${5}::int AS v`,
      sql`SELECT ${3}::int * 2 AS v`,
      ...Array.from({ length: 20 }, (_, i) => sql`SELECT ${i}::int + 100 AS v`),
    ]
    const settled = await Promise.allSettled(queries)
    const got = settled.map(r => (r.status === 'fulfilled' ? r.value[0].v : r.reason.code))
    const want = [1, 2, 3, '22012', 5, 6, ...Array.from({ length: 20 }, (_, i) => i + 100)]
    h.check(JSON.stringify(got) === JSON.stringify(want), `got ${JSON.stringify(got)}`)
    for (let i = 0; i < s.repeat; i++) {
      const [{ v }] = await sql`SELECT ${i}::int AS v`
      h.check(v === i, 'echo after the error')
    }
  } finally {
    await sql.end()
  }
}

async function copy(s) {
  const t = s.table('copy')
  const data = h.copyRows()
  const sql = connect(s, { max: 1 })
  try {
    await sql`DROP TABLE IF EXISTS ${sql(t)}`
    await sql`CREATE TABLE ${sql(t)} (id int PRIMARY KEY, t text)`
    const writable = await sql`COPY ${sql(t)} (id, t) FROM STDIN`.writable()
    writable.end(data)
    await finished(writable)
    const chunks = []
    const readable = await sql`COPY (SELECT id, t FROM ${sql(t)} ORDER BY id) TO STDOUT`.readable()
    for await (const chunk of readable) chunks.push(chunk)
    h.check(Buffer.concat(chunks).toString() === data, 'COPY TO gave back something else')
    const [{ n }] = await sql`SELECT count(*)::int AS n FROM ${sql(t)}`
    h.check(n === 1000, 'count after COPY')
  } finally {
    await sql.end()
  }
}

async function failedTx(s) {
  const t = s.table('tx')
  const sql = connect(s, { max: 1 })
  try {
    await sql`DROP TABLE IF EXISTS ${sql(t)}`
    await sql`CREATE TABLE ${sql(t)} (id int PRIMARY KEY)`
    await sql
      .begin(async tx => {
        await tx`INSERT INTO ${sql(t)} VALUES (${1})`
        await h.expectError('23505', () => tx`INSERT INTO ${sql(t)} VALUES (${1})`, 'duplicate')
        await h.expectError('25P02', () => tx`SELECT ${1}::int AS v`, 'a statement after the error')
        throw new Rollback()
      })
      .catch(error => {
        if (!(error instanceof Rollback)) throw error
      })
    for (let i = 0; i < s.repeat; i++) {
      const [{ v }] = await sql`SELECT ${i}::int AS v`
      h.check(v === i, 'echo after rollback')
    }
    const [{ n }] = await sql`SELECT count(*)::int AS n FROM ${sql(t)}`
    h.check(n === 0, "the failed transaction's row")
  } finally {
    await sql.end()
  }
}

async function cancel(s) {
  const sql = connect(s, { max: 1 })
  try {
    const start = Date.now()
    const query = sql`SELECT pg_sleep(10)`
    setTimeout(() => query.cancel(), 500)
    await h.expectError('57014', () => query, 'pg_sleep(10)')
    h.check(Date.now() - start < 8000, 'the cancel took effect only at the end')
    const [{ v }] = await sql`SELECT 1 AS v`
    h.check(v === 1, 'SELECT 1 after the cancel')
  } finally {
    await sql.end()
  }
}

async function listen(s) {
  const channel = s.table('chan')
  const listener = connect(s)
  const notifier = connect(s)
  try {
    const inbox = new h.Inbox()
    await listener.listen(channel, payload => inbox.push([channel, payload]))
    for (const payload of h.NOTIFY_PAYLOADS) {
      await h.sleep(300) // the listener is idle, between transactions
      await notifier.notify(channel, payload)
      h.expectNotifications(await inbox.next(5000), channel, payload)
    }
  } finally {
    await listener.end()
    await notifier.end()
  }
}

async function leak(s) {
  const a = connect(s, { leak: true, max: 1 })
  try {
    await a`SET app.tenant_id = 'A'`
    await a`CREATE TEMP TABLE leak_tmp (secret text)`
    await a`INSERT INTO leak_tmp VALUES ('A')`
    await a`SELECT pg_advisory_lock(${s.lockKey})`
    await a`SET statement_timeout = '1ms'`
  } finally {
    await a.end()
  }
  const b = connect(s, { leak: true, max: 1 })
  try {
    await h.clientB(async () => (await b.unsafe(h.LEAK_CHECK))[0])
  } finally {
    await b.end()
  }
}

h.main({ many, pipeline, copy, failed_tx: failedTx, cancel, listen, leak })
