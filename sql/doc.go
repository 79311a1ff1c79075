// Package sql owns warren's database schema: the embedded, versioned
// migrations that create the warren_outbox and warren_inbox tables, and
// Open, which opens a SQLite file with the pragmas warren relies on.
//
// The schema version is kept in warren_schema, never in PRAGMA user_version,
// which belongs to the application that shares the file.
//
//	db, err := sql.Open(ctx, "app.db")
//	...
//	err = sql.Migrate(ctx, db) // idempotent
//
// Every component calls Check before it starts, so a database that was never
// migrated, or that a newer warren migrated, is refused with a clear error.
package sql
