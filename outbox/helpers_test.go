package outbox_test

import (
	"context"
	"database/sql"

	wsql "github.com/warrenmq/warren/sql"
)

func openOther(path string) (*sql.DB, error) {
	return wsql.Open(context.Background(), path, wsql.Options{})
}
