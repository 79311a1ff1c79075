package main

import (
	"math"
	"testing"
	"time"
)

// The estimate interpolates within the bucket the rank falls in, as
// Prometheus' histogram_quantile does.
func TestHistogramQuantiles(t *testing.T) {
	h := histogram{
		bounds: []float64{0.001, 0.005, 0.01, 0.05, math.Inf(1)},
		counts: []float64{0, 50, 90, 100, 100}, // cumulative
	}
	q := h.quantiles()
	near := func(what string, got, want time.Duration) {
		t.Helper()
		if d := got - want; d < -time.Microsecond || d > time.Microsecond {
			t.Errorf("%s = %s, want %s", what, got, want)
		}
	}
	near("p50", q.P50, 5*time.Millisecond)                      // the 50th of 50 in (1, 5] ms
	near("p95", q.P95, 30*time.Millisecond)                     // 5 of 10 into (10, 50] ms
	near("p99", q.P99, 46*time.Millisecond)                     // 9 of 10 into (10, 50] ms
	near("max", q.Max, 50*time.Millisecond)                     // the highest bucket used
	near("minus", h.minus(h).quantiles().P99, time.Duration(0)) // nothing counted
}
