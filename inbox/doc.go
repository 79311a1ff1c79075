// Package inbox owns the warren_inbox table: recording deliveries
// idempotently inside the handler's own transaction, and the audit queries
// that read it back.
//
// A consumer claims a delivery and runs its handler in one transaction:
//
//	tx, _ := db.BeginTx(ctx, nil)
//	fresh, err := inbox.MarkProcessed(ctx, tx, d, attempt) // false: a duplicate
//	... the handler's own writes on tx ...
//	err = tx.Commit() // then ack the delivery
//
// A rollback undoes the claim together with the handler's writes, so the
// redelivery runs the handler again. Failures are recorded with
// RecordFailure once the handler's transaction was rolled back.
//
// List, Show and Stats read the trail; Prune drops old processed rows
// (never poisoned or retrying ones). ToJSON prints a delivery in the
// contract's "delivery as JSON" shape, for the HTTP sink and `warren inbox
// show`.
package inbox
