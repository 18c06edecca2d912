// A product service in Java (JDBC, org.postgresql:postgresql) writes its own row and its widget
// in one transaction. `widget_enqueue` and `widget_next_version` are installed by
// `widget-runtime migrate product`; a broken rule is an SQLException whose getSQLState() is in
// class WK (WK001 key, WK002 type, WK003 version, WK004 missing content, WK005 content too large).
//
//   java -cp postgresql.jar Produce.java deal-42 "Espresso machine" 8999
//   (with SOURCE_DATABASE_URL=jdbc:postgresql://host/db?user=...&password=...)
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;

public class Produce {
    static long publishDeal(Connection conn, String dealId, String title, int priceCents) throws SQLException {
        conn.setAutoCommit(false);
        try {
            try (var st = conn.createStatement()) {
                st.execute("CREATE TABLE IF NOT EXISTS deals ("
                        + "id text PRIMARY KEY, title text NOT NULL, price_cents integer NOT NULL)");
            }
            try (PreparedStatement ps = conn.prepareStatement(
                    "INSERT INTO deals (id, title, price_cents) VALUES (?, ?, ?) "
                            + "ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title, price_cents = EXCLUDED.price_cents")) {
                ps.setString(1, dealId);
                ps.setString(2, title);
                ps.setInt(3, priceCents);
                ps.executeUpdate();
            }
            String key = "deals.top-picks";
            long version;
            try (PreparedStatement ps = conn.prepareStatement("SELECT widget_next_version(?)")) {
                ps.setString(1, key);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    version = rs.getLong(1);
                }
            }
            // Build the JSON with your JSON library of choice; escaped by hand here to stay
            // dependency-free.
            String content = String.format(
                    "{\"title\": \"%s\", \"deal\": \"%s\", \"price\": {\"cents\": %d, \"currency\": \"EUR\"}}",
                    title.replace("\\", "\\\\").replace("\"", "\\\""), dealId, priceCents);
            try (PreparedStatement ps = conn.prepareStatement("SELECT widget_enqueue(?, ?, ?, ?::jsonb)")) {
                ps.setString(1, key);
                ps.setString(2, "deal-card");
                ps.setLong(3, version);
                ps.setString(4, content);
                ps.execute();
            }
            conn.commit();
            return version;
        } catch (SQLException e) {
            conn.rollback();
            throw e;
        }
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 3) {
            System.err.println("usage: java Produce.java DEAL_ID TITLE PRICE_CENTS");
            System.exit(2);
        }
        try (Connection conn = DriverManager.getConnection(System.getenv("SOURCE_DATABASE_URL"))) {
            long version = publishDeal(conn, args[0], args[1], Integer.parseInt(args[2]));
            System.out.printf("{\"key\":\"deals.top-picks\",\"version\":%d}%n", version);
        } catch (SQLException e) {
            System.err.printf("not published (%s): %s%n", e.getSQLState(), e.getMessage());
            System.exit(1);
        }
    }
}
