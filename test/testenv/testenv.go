// Package testenv holds small helpers shared by warren's tests: a migrated
// SQLite database in a temporary folder, the broker URL, unique names.
package testenv

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	wsql "github.com/warrenmq/warren/sql"
)

// DefaultURL is the shared test broker.
const DefaultURL = "amqp://guest:guest@localhost:5672/"

// URL returns the broker tests use: WARREN_URL, or DefaultURL.
func URL() string {
	if u := os.Getenv("WARREN_URL"); u != "" {
		return u
	}
	return DefaultURL
}

// Name returns prefix plus a random suffix: a valid application name that
// no other test uses.
func Name(prefix string) string {
	b := make([]byte, 5)
	_, _ = rand.Read(b)
	prefix = strings.ToLower(prefix)
	if len(prefix) > 40 {
		prefix = prefix[:40]
	}
	return prefix + "-" + hex.EncodeToString(b)
}

// DB opens a new migrated database in t.TempDir() and returns it with its
// path. It is closed when the test ends.
func DB(t testing.TB) (*sql.DB, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "app.db")
	db, err := wsql.Open(context.Background(), path, wsql.Options{})
	if err != nil {
		t.Fatalf("open test database: %v", err)
	}
	t.Cleanup(func() { _ = db.Close() })
	if _, err := wsql.Migrate(context.Background(), db); err != nil {
		t.Fatalf("migrate test database: %v", err)
	}
	return db, path
}
