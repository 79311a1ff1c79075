package outbox_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/outbox"
	wsql "github.com/warrenmq/warren/sql"
)

func TestLockedDatabaseGivesAClearErrorAndWritesNothing(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "app.db")
	holder, err := wsql.Open(ctx, path, wsql.Options{})
	require.NoError(t, err)
	defer holder.Close()
	_, err = wsql.Migrate(ctx, holder)
	require.NoError(t, err)

	impatient, err := wsql.Open(ctx, path, wsql.Options{BusyTimeout: 200 * time.Millisecond})
	require.NoError(t, err)
	defer impatient.Close()

	// Another writer holds the write lock longer than the busy timeout.
	tx, err := holder.BeginTx(ctx, nil)
	require.NoError(t, err)
	_, err = tx.Exec(`CREATE TABLE business (n INTEGER)`)
	require.NoError(t, err)

	start := time.Now()
	_, err = outbox.AppendDB(ctx, impatient, event("1"), event("2"))
	require.Error(t, err)
	require.True(t, wsql.IsBusy(err), "errors.As finds SQLite's busy error: %v", err)
	require.Contains(t, err.Error(), "busy timeout; nothing was written")
	require.Less(t, time.Since(start), 5*time.Second)
	require.NoError(t, tx.Rollback())

	rows, err := outbox.ReadUnpublished(ctx, impatient, 0, 10, 0)
	require.NoError(t, err)
	require.Empty(t, rows, "no partial write")
	_, err = outbox.AppendDB(ctx, impatient, event("1"))
	require.NoError(t, err, "works once the lock is free")
}
