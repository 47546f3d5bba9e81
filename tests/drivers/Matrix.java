/*
 * pgjdbc's scenarios of the driver matrix (tests/test_drivers.py), compiled by
 * the test with javac against Debian's libpostgresql-jdbc-java. pgjdbc in its
 * default settings: prepareThreshold=5 (a PreparedStatement becomes a named
 * server statement, S_N, from its fifth execution), batches sent as one
 * pipeline, Statement.cancel() sending a CancelRequest.
 *
 * Same contract as the Python programs (tests/drivers/harness.py): settings
 * from MATRIX_* variables, one JSON line per scenario on stdout.
 */

import java.io.StringReader;
import java.io.StringWriter;
import java.sql.BatchUpdateException;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;

public class Matrix {
    interface Scenario {
        void run() throws Exception;
    }

    static final String LEAK_CHECK =
        "SELECT coalesce(current_setting('app.tenant_id', true), '') AS tenant, "
            + "coalesce(to_regclass('pg_temp.leak_tmp')::text, '') AS temp_table, "
            + "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            + "AND pid = pg_backend_pid())::int AS locks, "
            + "current_setting('statement_timeout') AS statement_timeout";

    static String env(String name) {
        String value = System.getenv(name);
        if (value == null) {
            throw new IllegalStateException("no " + name);
        }
        return value;
    }

    static final String PREFIX = env("MATRIX_PREFIX");
    static final int CLIENTS = Integer.parseInt(env("MATRIX_CLIENTS"));
    static final int REPEAT = Integer.parseInt(env("MATRIX_REPEAT"));

    static Connection connect(boolean leak) throws SQLException {
        String port = env(leak ? "MATRIX_LEAK_PORT" : "MATRIX_PORT");
        Properties props = new Properties();
        props.setProperty("user", env("MATRIX_USER"));
        props.setProperty("password", env("MATRIX_PASSWORD"));
        props.setProperty("sslmode", "verify-full");
        props.setProperty("sslrootcert", env("MATRIX_CA"));
        props.setProperty("connectTimeout", "10");
        String url = "jdbc:postgresql://" + env("MATRIX_HOST") + ":" + port + "/" + env("MATRIX_DB");
        return DriverManager.getConnection(url, props);
    }

    static String table(String name) {
        return PREFIX + "_" + name;
    }

    static void check(boolean condition, String what) {
        if (!condition) {
            throw new AssertionError(what);
        }
    }

    static long scalar(Connection c, String sql) throws SQLException {
        try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            rs.next();
            return rs.getLong(1);
        }
    }

    static int echo(PreparedStatement ps, int value) throws SQLException {
        ps.setInt(1, value);
        try (ResultSet rs = ps.executeQuery()) {
            rs.next();
            return rs.getInt(1);
        }
    }

    static void recreate(Connection c, String table, String columns) throws SQLException {
        try (Statement st = c.createStatement()) {
            st.execute("DROP TABLE IF EXISTS " + table);
            st.execute("CREATE TABLE " + table + " (" + columns + ")");
        }
    }

    static SQLException expectError(String sqlstate, Scenario action, String what) throws Exception {
        try {
            action.run();
        } catch (SQLException e) {
            String got = e.getSQLState();
            if (e instanceof BatchUpdateException && e.getNextException() != null) {
                got = e.getNextException().getSQLState();
            }
            if (!sqlstate.equals(got)) {
                throw new AssertionError(what + ": expected SQLSTATE " + sqlstate + ", got " + describe(e), e);
            }
            return e;
        }
        throw new AssertionError(what + ": expected SQLSTATE " + sqlstate + ", but it succeeded");
    }

    // -- scenarios -------------------------------------------------------------

    static void many() throws Exception {
        String t = table("many");
        try (Connection c = connect(false)) {
            recreate(c, t, "client int, i int, v int");
        }
        ExecutorService pool = Executors.newFixedThreadPool(CLIENTS);
        List<Future<Object>> clients = new ArrayList<>();
        for (int n = 0; n < CLIENTS; n++) {
            final int client = n;
            clients.add(pool.submit(() -> {
                try (Connection c = connect(false);
                    PreparedStatement sel = c.prepareStatement("SELECT ?::int + 1");
                    PreparedStatement ins = c.prepareStatement("INSERT INTO " + t + " VALUES (?, ?, ?)")) {
                    c.setAutoCommit(false);
                    for (int i = 0; i < REPEAT; i++) {
                        int v = echo(sel, i);
                        check(v == i + 1, "client " + client + " got " + v);
                        ins.setInt(1, client);
                        ins.setInt(2, i);
                        ins.setInt(3, v);
                        ins.executeUpdate();
                        c.commit();
                    }
                }
                return null;
            }));
        }
        try {
            for (Future<Object> f : clients) {
                try {
                    f.get();
                } catch (java.util.concurrent.ExecutionException e) {
                    throw (Exception) e.getCause();
                }
            }
        } finally {
            pool.shutdownNow();
        }
        try (Connection c = connect(false)) {
            long count = scalar(c, "SELECT count(*) FROM " + t);
            check(count == CLIENTS * REPEAT, "count " + count);
        }
    }

    static void pipeline() throws Exception {
        String t = table("pipe");
        try (Connection c = connect(false)) {
            recreate(c, t, "id int PRIMARY KEY");
            try (PreparedStatement ins = c.prepareStatement("INSERT INTO " + t + " VALUES (?)");
                Statement st = c.createStatement();
                PreparedStatement sel = c.prepareStatement("SELECT ?::int * 2")) {
                // Six batches of the same insert: past prepareThreshold in a batch.
                for (int b = 0; b < 6; b++) {
                    for (int i = 0; i < 10; i++) {
                        ins.setInt(1, b * 10 + i);
                        ins.addBatch();
                    }
                    ins.executeBatch();
                }
                st.addBatch("INSERT INTO " + t + " VALUES (1000)");
                st.addBatch("INSERT INTO " + t + " VALUES (1001)");
                st.executeBatch();
                for (int i = 100; i < 120; i++) {
                    ins.setInt(1, i == 110 ? 105 : i);
                    ins.addBatch();
                }
                expectError("23505", () -> ins.executeBatch(), "a batch with a duplicate");
                check(scalar(c, "SELECT count(*) FROM " + t + " WHERE id < 100 OR id >= 1000") == 62,
                    "the batches before the error are not all there");
                for (int i = 0; i < REPEAT; i++) {
                    check(echo(sel, i) == i * 2, "echo after the failed batch");
                }
            }
        }
    }

    static void copy() throws Exception {
        String t = table("copy");
        StringBuilder data = new StringBuilder();
        for (int i = 0; i < 1000; i++) {
            data.append(i).append("\trow-").append(i).append("\n");
        }
        try (Connection c = connect(false)) {
            recreate(c, t, "id int PRIMARY KEY, t text");
            CopyManager copy = c.unwrap(PGConnection.class).getCopyAPI();
            long in = copy.copyIn("COPY " + t + " (id, t) FROM STDIN", new StringReader(data.toString()));
            check(in == 1000, "COPY FROM copied " + in);
            StringWriter out = new StringWriter();
            copy.copyOut("COPY (SELECT id, t FROM " + t + " ORDER BY id) TO STDOUT", out);
            check(out.toString().equals(data.toString()), "COPY TO gave back something else");
            check(scalar(c, "SELECT count(*) FROM " + t) == 1000, "count after COPY");
        }
    }

    static void failedTx() throws Exception {
        String t = table("tx");
        try (Connection c = connect(false)) {
            recreate(c, t, "id int PRIMARY KEY");
            c.setAutoCommit(false);
            try (PreparedStatement ins = c.prepareStatement("INSERT INTO " + t + " VALUES (?)");
                PreparedStatement sel = c.prepareStatement("SELECT ?::int")) {
                ins.setInt(1, 1);
                ins.executeUpdate();
                expectError("23505", () -> ins.executeUpdate(), "duplicate");
                expectError("25P02", () -> echo(sel, 1), "a statement after the error");
                c.rollback();
                for (int i = 0; i < REPEAT; i++) {
                    check(echo(sel, i) == i, "echo after rollback");
                }
                check(scalar(c, "SELECT count(*) FROM " + t) == 0, "the failed transaction's row");
                c.commit();
            }
        }
    }

    static void cancel() throws Exception {
        try (Connection c = connect(false); Statement st = c.createStatement()) {
            Thread canceller = new Thread(() -> {
                try {
                    Thread.sleep(500);
                    st.cancel();
                } catch (Exception e) {
                    // seen below as pg_sleep running to its end
                }
            });
            canceller.setDaemon(true);
            canceller.start();
            long start = System.nanoTime();
            expectError("57014", () -> st.executeQuery("SELECT pg_sleep(10)").close(), "pg_sleep(10)");
            check(System.nanoTime() - start < 8_000_000_000L, "the cancel took effect only at the end");
            check(scalar(c, "SELECT 1") == 1, "SELECT 1 after the cancel");
        }
    }

    static void listen() throws Exception {
        String channel = table("chan");
        try (Connection listener = connect(false); Connection notifier = connect(false)) {
            try (Statement st = listener.createStatement()) {
                st.execute("LISTEN " + channel);
            }
            PGConnection pg = listener.unwrap(PGConnection.class);
            for (String payload : new String[] {"first", "second"}) {
                Thread.sleep(300); // the listener is idle, between transactions
                try (PreparedStatement ps = notifier.prepareStatement("SELECT pg_notify(?, ?)")) {
                    ps.setString(1, channel);
                    ps.setString(2, payload);
                    ps.executeQuery().close();
                }
                PGNotification[] got = pg.getNotifications(5000);
                String seen = "[]";
                if (got != null && got.length > 0) {
                    StringBuilder b = new StringBuilder();
                    for (PGNotification n : got) {
                        b.append("(").append(n.getName()).append(", ").append(n.getParameter()).append(")");
                    }
                    seen = b.toString();
                }
                check(got != null && got.length == 1 && got[0].getName().equals(channel)
                        && got[0].getParameter().equals(payload),
                    "expected notification " + payload + " on " + channel + " within 5s, got " + seen);
            }
            check(scalar(listener, "SELECT 1") == 1, "SELECT 1 on the listener");
        }
    }

    static void leak() throws Exception {
        String lock = env("MATRIX_LOCK_KEY");
        try (Connection a = connect(true); Statement st = a.createStatement()) {
            st.execute("SET app.tenant_id = 'A'");
            st.execute("CREATE TEMP TABLE leak_tmp (secret text)");
            st.execute("INSERT INTO leak_tmp VALUES ('A')");
            st.executeQuery("SELECT pg_advisory_lock(" + lock + ")").close();
            st.execute("SET statement_timeout = '1ms'");
        }
        try (Connection b = connect(true); Statement st = b.createStatement()) {
            List<String> leaked = new ArrayList<>();
            try (ResultSet rs = st.executeQuery(LEAK_CHECK)) {
                rs.next();
                if (!rs.getString(1).isEmpty()) {
                    leaked.add("app.tenant_id = '" + rs.getString(1) + "'");
                }
                if (!rs.getString(2).isEmpty()) {
                    leaked.add("temporary table " + rs.getString(2));
                }
                if (rs.getInt(3) != 0) {
                    leaked.add(rs.getInt(3) + " advisory lock(s) held by B's backend");
                }
                if (!rs.getString(4).equals("0")) {
                    leaked.add("statement_timeout = '" + rs.getString(4) + "'");
                }
            } catch (SQLException e) {
                throw new AssertionError("client B's check failed: " + describe(e), e);
            }
            check(leaked.isEmpty(), "client B inherited client A's session: " + String.join(", ", leaked));
        }
    }

    // -- the harness -----------------------------------------------------------

    static String describe(Throwable e) {
        String code = e instanceof SQLException ? " [" + ((SQLException) e).getSQLState() + "]" : "";
        String where = "?";
        for (StackTraceElement frame : e.getStackTrace()) {
            if (frame.getClassName().startsWith("Matrix") && !frame.getMethodName().equals("check")) {
                where = "Matrix.java:" + frame.getLineNumber();
                break;
            }
        }
        String text = e.getClass().getName() + code + ": " + e.getMessage() + "\n  (at " + where + ")";
        if (e instanceof SQLException && ((SQLException) e).getNextException() != null) {
            text += "\n  next: " + ((SQLException) e).getNextException().getMessage();
        }
        return text;
    }

    static String json(String s) {
        if (s == null) {
            return "null";
        }
        StringBuilder b = new StringBuilder("\"");
        for (char ch : s.toCharArray()) {
            switch (ch) {
                case '"': b.append("\\\""); break;
                case '\\': b.append("\\\\"); break;
                case '\n': b.append("\\n"); break;
                case '\r': b.append("\\r"); break;
                case '\t': b.append("\\t"); break;
                default:
                    if (ch < 0x20) {
                        b.append(String.format("\\u%04x", (int) ch));
                    } else {
                        b.append(ch);
                    }
            }
        }
        return b.append('"').toString();
    }

    public static void main(String[] args) throws Exception {
        Map<String, Scenario> scenarios = new LinkedHashMap<>();
        scenarios.put("many", Matrix::many);
        scenarios.put("pipeline", Matrix::pipeline);
        scenarios.put("copy", Matrix::copy);
        scenarios.put("failed_tx", Matrix::failedTx);
        scenarios.put("cancel", Matrix::cancel);
        scenarios.put("listen", Matrix::listen);
        scenarios.put("leak", Matrix::leak);
        double timeout = Double.parseDouble(env("MATRIX_TIMEOUT"));
        for (String name : env("MATRIX_SCENARIOS").split(",")) {
            ExecutorService one = Executors.newSingleThreadExecutor(r -> {
                Thread thread = new Thread(r, name);
                thread.setDaemon(true);
                return thread;
            });
            long start = System.nanoTime();
            String error = null;
            Future<Object> done = one.submit(() -> {
                scenarios.get(name).run();
                return null;
            });
            try {
                done.get((long) (timeout * 1000), TimeUnit.MILLISECONDS);
            } catch (TimeoutException e) {
                error = "still running after " + timeout + "s";
            } catch (java.util.concurrent.ExecutionException e) {
                error = describe(e.getCause());
            }
            one.shutdownNow();
            double seconds = (System.nanoTime() - start) / 1e9;
            System.out.println("{\"scenario\": " + json(name) + ", \"ok\": " + (error == null)
                + ", \"error\": " + json(error) + ", \"seconds\": " + String.format("%.3f", seconds) + "}");
            System.out.flush();
        }
        System.exit(0);
    }
}
