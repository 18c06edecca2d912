// A product service in Go (pgx) writes its own row and its widget in one transaction.
// `widget_enqueue` and `widget_next_version` are installed by `widget-runtime migrate product`;
// a broken rule is a typed error (*pgconn.PgError, Code in SQLSTATE class WK: WK001 key,
// WK002 type, WK003 version, WK004 missing content, WK005 content too large).
//
//	go mod init produce && go get github.com/jackc/pgx/v5
//	SOURCE_DATABASE_URL=postgresql://... go run . deal-42 "Espresso machine" 8999
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

func publishDeal(ctx context.Context, conn *pgx.Conn, dealID, title string, priceCents int) (int64, error) {
	var version int64
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS deals (
			id text PRIMARY KEY, title text NOT NULL, price_cents integer NOT NULL)`); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO deals (id, title, price_cents) VALUES ($1, $2, $3)
			ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title, price_cents = EXCLUDED.price_cents`,
			dealID, title, priceCents); err != nil {
			return err
		}
		const key = "deals.top-picks"
		if err := tx.QueryRow(ctx, "SELECT widget_next_version($1)", key).Scan(&version); err != nil {
			return err
		}
		content, err := json.Marshal(map[string]any{
			"title": title, "deal": dealID,
			"price": map[string]any{"cents": priceCents, "currency": "EUR"},
		})
		if err != nil {
			return err
		}
		_, err = tx.Exec(ctx, "SELECT widget_enqueue($1, $2, $3, $4::jsonb)",
			key, "deal-card", version, string(content))
		return err
	})
	return version, err
}

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: go run . DEAL_ID TITLE PRICE_CENTS")
		os.Exit(2)
	}
	price, err := strconv.Atoi(os.Args[3])
	if err != nil {
		fmt.Fprintln(os.Stderr, "PRICE_CENTS must be a number")
		os.Exit(2)
	}
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, os.Getenv("SOURCE_DATABASE_URL"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer conn.Close(ctx)
	version, err := publishDeal(ctx, conn, os.Args[1], os.Args[2], price)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		fmt.Fprintf(os.Stderr, "not published (%s): %s\n", pgErr.Code, pgErr.Message)
		os.Exit(1)
	} else if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("{\"key\":\"deals.top-picks\",\"version\":%d}\n", version)
}
