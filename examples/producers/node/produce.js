// A product service in Node.js (node-postgres) writes its own row and its widget in one
// transaction. `widget_enqueue` and `widget_next_version` are installed by
// `widget-runtime migrate product`; a broken rule is a typed error (err.code, SQLSTATE class
// WK: WK001 key, WK002 type, WK003 version, WK004 missing content, WK005 content too large).
//
//   npm install pg
//   SOURCE_DATABASE_URL=postgresql://... node produce.js deal-42 "Espresso machine" 8999
const { Client } = require("pg");

async function publishDeal(client, dealId, title, priceCents) {
  await client.query("BEGIN");
  try {
    await client.query(
      `CREATE TABLE IF NOT EXISTS deals (
         id text PRIMARY KEY, title text NOT NULL, price_cents integer NOT NULL)`);
    await client.query(
      `INSERT INTO deals (id, title, price_cents) VALUES ($1, $2, $3)
       ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title, price_cents = EXCLUDED.price_cents`,
      [dealId, title, priceCents]);
    const key = "deals.top-picks";
    const { rows } = await client.query("SELECT widget_next_version($1) AS v", [key]);
    const version = rows[0].v;
    const content = { title, price: { cents: priceCents, currency: "EUR" }, deal: dealId };
    await client.query("SELECT widget_enqueue($1, $2, $3, $4::jsonb)",
      [key, "deal-card", version, JSON.stringify(content)]);
    await client.query("COMMIT");
    return version;
  } catch (err) {
    await client.query("ROLLBACK");
    throw err;
  }
}

async function main() {
  const [dealId, title, price] = process.argv.slice(2);
  if (!dealId || !title || !price) {
    console.error("usage: node produce.js DEAL_ID TITLE PRICE_CENTS");
    process.exit(2);
  }
  const client = new Client({ connectionString: process.env.SOURCE_DATABASE_URL });
  await client.connect();
  try {
    const version = await publishDeal(client, dealId, title, Number(price));
    console.log(JSON.stringify({ key: "deals.top-picks", version: String(version) }));
  } catch (err) {
    console.error(`not published (${err.code}): ${err.message}`);
    process.exitCode = 1;
  } finally {
    await client.end();
  }
}

main();
