// sleep sleeps for an hour, then says so.
package main

import (
	"fmt"
	"time"
)

func main() {
	time.Sleep(time.Hour)
	fmt.Println("woke up")
}
