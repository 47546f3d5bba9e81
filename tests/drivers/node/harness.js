// What the Node.js programs of the driver matrix share (tests/test_drivers.py):
// settings from MATRIX_* variables, the leak scenario's SQL and checks, and
// the loop that runs each scenario with a deadline and prints one JSON line
// per scenario, as tests/drivers/harness.py does for the Python programs.
'use strict'

const fs = require('fs')

function env(name) {
  const value = process.env[name]
  if (value === undefined) throw new Error(`no ${name}`)
  return value
}

const settings = {
  host: env('MATRIX_HOST'),
  port: Number(env('MATRIX_PORT')),
  leakPort: Number(env('MATRIX_LEAK_PORT')),
  database: env('MATRIX_DB'),
  user: env('MATRIX_USER'),
  password: env('MATRIX_PASSWORD'),
  ca: fs.readFileSync(env('MATRIX_CA')),
  prefix: env('MATRIX_PREFIX'),
  lockKey: Number(env('MATRIX_LOCK_KEY')),
  scenarios: env('MATRIX_SCENARIOS').split(','),
  clients: Number(env('MATRIX_CLIENTS')),
  repeat: Number(env('MATRIX_REPEAT')),
  timeout: Number(env('MATRIX_TIMEOUT')),
  table: name => `${env('MATRIX_PREFIX')}_${name}`,
}

const NOTIFY_PAYLOADS = ['first', 'second']

const LEAK_CHECK =
  "SELECT coalesce(current_setting('app.tenant_id', true), '') AS tenant, " +
  "coalesce(to_regclass('pg_temp.leak_tmp')::text, '') AS temp_table, " +
  "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' " +
  'AND pid = pg_backend_pid())::int AS locks, ' +
  "current_setting('statement_timeout') AS statement_timeout"

function copyRows(count = 1000) {
  let text = ''
  for (let i = 0; i < count; i++) text += `${i}\trow-${i}\n`
  return text
}

function check(condition, what) {
  if (!condition) throw new Error(what)
}

function describe(error) {
  const code = error && error.code ? ` [${error.code}]` : ''
  const name = (error && error.constructor && error.constructor.name) || 'Error'
  const frames = String((error && error.stack) || '').split('\n')
  const own = frames.find(f => /^\s+at .*(node_pg|postgresjs)\.js:\d+/.test(f))
  const where = own ? own.replace(/.*\/([^/]+\.js:\d+).*/, '$1') : '?'
  return `${name}${code}: ${error && error.message}\n  (at ${where})`
}

async function expectError(sqlstate, action, what) {
  try {
    await action()
  } catch (error) {
    if (error.code !== sqlstate) {
      throw new Error(`${what}: expected SQLSTATE ${sqlstate}, got ${describe(error)}`)
    }
    return error
  }
  throw new Error(`${what}: expected SQLSTATE ${sqlstate}, but it succeeded`)
}

function checkNoLeak(row) {
  const leaked = []
  if (row.tenant) leaked.push(`app.tenant_id = '${row.tenant}'`)
  if (row.temp_table) leaked.push(`temporary table ${row.temp_table}`)
  if (Number(row.locks)) leaked.push(`${row.locks} advisory lock(s) held by B's backend`)
  if (row.statement_timeout !== '0') leaked.push(`statement_timeout = '${row.statement_timeout}'`)
  if (leaked.length) throw new Error(`client B inherited client A's session: ${leaked.join(', ')}`)
}

// Client B's check: its row judged, or its error (A's statement timeout) as a leak.
async function clientB(query) {
  let row
  try {
    row = await query()
  } catch (error) {
    throw new Error(`client B's check failed: ${describe(error)}`)
  }
  checkNoLeak(row)
}

function sleep(ms) {
  return new Promise(resolve => setTimeout(resolve, ms))
}

// Notifications as [channel, payload] pairs, and a wait for the next one.
class Inbox {
  constructor() {
    this.items = []
    this.waiters = []
  }

  push(item) {
    const waiter = this.waiters.shift()
    if (waiter) waiter(item)
    else this.items.push(item)
  }

  async next(ms) {
    if (this.items.length) return [this.items.shift()]
    return new Promise(resolve => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter(w => w !== got)
        resolve([])
      }, ms)
      const got = item => {
        clearTimeout(timer)
        resolve([item])
      }
      this.waiters.push(got)
    })
  }
}

function expectNotifications(got, channel, payload) {
  const ok = got.length === 1 && got[0][0] === channel && got[0][1] === payload
  check(ok, `expected notification '${payload}' on '${channel}' within 5s, got ${JSON.stringify(got)}`)
}

async function main(scenarios) {
  // A query of a scenario that missed its deadline may fail later: not a crash.
  process.on('unhandledRejection', error => process.stderr.write(`late: ${describe(error)}\n`))
  for (const name of settings.scenarios) {
    const start = process.hrtime.bigint()
    let error = null
    let timer
    const deadline = new Promise(resolve => {
      timer = setTimeout(() => resolve(`still running after ${settings.timeout}s`), settings.timeout * 1000)
    })
    try {
      const run = scenarios[name](settings).then(() => null)
      error = await Promise.race([run, deadline])
    } catch (e) {
      error = describe(e)
    }
    clearTimeout(timer)
    const seconds = Number(process.hrtime.bigint() - start) / 1e9
    process.stdout.write(JSON.stringify({ scenario: name, ok: error === null, error, seconds }) + '\n')
  }
  process.exit(0)
}

module.exports = {
  settings,
  NOTIFY_PAYLOADS,
  LEAK_CHECK,
  copyRows,
  check,
  describe,
  expectError,
  clientB,
  sleep,
  Inbox,
  expectNotifications,
  main,
}
