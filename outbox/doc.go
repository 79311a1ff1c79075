// Package outbox appends events to the warren_outbox table inside the
// application's own SQL transaction, and reads, marks and prunes them for the
// relay.
//
// An event appended with Append commits or rolls back with the caller's
// business writes: a rolled-back transaction leaves no event behind, a
// committed one will be published by the relay. AppendDB is the twin that
// opens its own transaction.
//
//	tx, _ := db.BeginTx(ctx, nil)
//	_, _ = tx.ExecContext(ctx, `UPDATE company SET name = ? WHERE id = ?`, name, id)
//	_, err := outbox.Append(ctx, tx, outbox.Event{
//		Producer: "crm", Type: "company.updated",
//		AggregateType: "company", AggregateID: id,
//		Payload: payload,
//	})
//	...
//	err = tx.Commit()
//
// The table is public: an application in another language may insert rows
// itself (see the contract). Rows are validated again when they are read, so
// a row written by hand with a wrong type is reported, never published
// wrongly.
package outbox
