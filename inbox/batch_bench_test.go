package inbox_test

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"

	"github.com/warrenmq/warren/inbox"
	wsql "github.com/warrenmq/warren/sql"
)

// BenchmarkMarkProcessedBatch is the consumer's committer without the
// broker: transactions of n processed rows (300-byte bodies, time-ordered
// ids) on a SQLite file with warren's pragmas, commit and fsync included.
// It prints the CPU time per row, user and system, for batch sizes from 4
// to 128: the fixed cost of a commit shows as what shrinks with the batch.
//
//	go test -run '^$' -bench MarkProcessedBatch -benchtime 64000x ./inbox
func BenchmarkMarkProcessedBatch(b *testing.B) {
	body := []byte(`{"id":42,"name":"Acme Corporation","street":"1 Main Street","city":"Springfield","country":"US","vat":"US123456789","tags":["customer","gold"],"updatedBy":"alice@example.com","note":"` + strings.Repeat("x", 80) + `"}`)
	for _, batch := range []int{4, 16, 32, 64, 128} {
		b.Run(fmt.Sprint(batch), func(b *testing.B) {
			ctx := context.Background()
			db, err := wsql.Open(ctx, filepath.Join(b.TempDir(), "inbox.db"), wsql.Options{})
			require.NoError(b, err)
			defer func() { _ = db.Close() }()
			_, err = wsql.Migrate(ctx, db)
			require.NoError(b, err)
			var r0, r1 syscall.Rusage
			_ = syscall.Getrusage(syscall.RUSAGE_SELF, &r0)
			b.ResetTimer()
			for i := 0; i < b.N; i += batch {
				tx, err := db.BeginTx(ctx, nil)
				require.NoError(b, err)
				for range batch {
					id, err := uuid.NewV7()
					require.NoError(b, err)
					d := delivery("bench", id.String())
					d.Body = body
					row, err := inbox.EncodeProcessed(d, 1)
					require.NoError(b, err)
					fresh, err := inbox.MarkProcessedRow(ctx, tx, row)
					require.NoError(b, err)
					require.True(b, fresh)
				}
				require.NoError(b, tx.Commit())
			}
			b.StopTimer()
			_ = syscall.Getrusage(syscall.RUSAGE_SELF, &r1)
			user := time.Duration(r1.Utime.Nano() - r0.Utime.Nano())
			sys := time.Duration(r1.Stime.Nano() - r0.Stime.Nano())
			b.ReportMetric(float64(user.Nanoseconds())/1000/float64(b.N), "user-µs/row")
			b.ReportMetric(float64(sys.Nanoseconds())/1000/float64(b.N), "sys-µs/row")
		})
	}
}
