package outbox

import (
	"regexp"
	"strings"
	"testing"
)

// contractName is the contract's application name pattern, which
// validName implements by hand.
var contractName = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

func TestValidNameIsTheContractPattern(t *testing.T) {
	cases := []string{"", "a", "0", "-", "-a", "a-", "crm", "billing-2", "Crm", "crm.events", "crm_x", "é",
		strings.Repeat("a", 63), strings.Repeat("a", 64), "a\n", " a", "a b"}
	for _, c := range cases {
		if got, want := validName(c), contractName.MatchString(c); got != want {
			t.Errorf("validName(%q) = %v, the contract says %v", c, got, want)
		}
	}
}

func FuzzValidName(f *testing.F) {
	for _, s := range []string{"crm", "-x", "a-b-c", strings.Repeat("z", 64)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if got, want := validName(s), contractName.MatchString(s); got != want {
			t.Errorf("validName(%q) = %v, the contract says %v", s, got, want)
		}
	})
}
