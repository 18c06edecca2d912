fn main() {
    println!("widget-operator: see the operator issue");
}
