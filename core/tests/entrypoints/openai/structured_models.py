"""Twenty varied pydantic models for the structured-output tests: nested objects, arrays, enums,
optional fields, bounded numbers and strings (what chat.completions.parse sends as a strict schema)."""

from __future__ import annotations

from enum import Enum
from typing import Literal, Optional

from pydantic import BaseModel, Field


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int = Field(ge=0, le=120)


class Point(BaseModel):
    x: float
    y: float


class Rectangle(BaseModel):
    top_left: Point
    bottom_right: Point


class Weather(BaseModel):
    city: str = Field(max_length=30)
    temperature_c: float = Field(ge=-60, le=60)
    condition: Literal["sunny", "cloudy", "rainy", "snowy"]


class Paint(BaseModel):
    color: Color
    liters: int = Field(ge=1, le=20)


class Tags(BaseModel):
    tags: list[str] = Field(max_length=4)


class Scores(BaseModel):
    scores: list[int] = Field(min_length=1, max_length=5)


class Address(BaseModel):
    street: str = Field(max_length=40)
    city: str = Field(max_length=30)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Customer(BaseModel):
    name: str = Field(max_length=30)
    address: Address
    vip: bool


class Book(BaseModel):
    title: str = Field(max_length=40)
    year: int = Field(ge=1450, le=2030)
    isbn: Optional[str] = Field(default=None, max_length=17)


class Library(BaseModel):
    books: list[Book] = Field(max_length=3)


class Flag(BaseModel):
    enabled: bool


class Rating(BaseModel):
    stars: int = Field(ge=1, le=5)
    comment: Optional[str] = Field(default=None, max_length=40)


class Probability(BaseModel):
    p: float = Field(ge=0.0, le=1.0)


class Step(BaseModel):
    number: int = Field(ge=1, le=10)
    action: str = Field(max_length=30)


class Recipe(BaseModel):
    name: str = Field(max_length=30)
    steps: list[Step] = Field(min_length=1, max_length=3)


class Status(BaseModel):
    state: Literal["queued", "running", "done", "failed"]
    progress: int = Field(ge=0, le=100)


class Matrix(BaseModel):
    rows: list[list[int]] = Field(max_length=3)


class Contact(BaseModel):
    email: Optional[str] = Field(default=None, max_length=40)
    phone: Optional[str] = Field(default=None, pattern=r"^\+?[0-9]{7,12}$")


class Inventory(BaseModel):
    item: str = Field(max_length=20)
    counts: dict[str, int] = Field(max_length=3)  # maxProperties: an open dict lets a small model loop


MODELS: list[type[BaseModel]] = [
    Person, Rectangle, Weather, Paint, Tags, Scores, Customer, Library, Flag, Rating,
    Probability, Recipe, Status, Matrix, Contact, Point, Book, Address, Step, Inventory,
]
PROMPTS = {m.__name__: f"Give an example {m.__name__.lower()} as JSON." for m in MODELS}
